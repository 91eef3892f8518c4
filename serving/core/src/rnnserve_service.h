// rnnserve.v1 natively: Step, Session, StepMany (entries and packed blocks) and the session
// lifecycle. ListModels, GetModel, Generate and Predict go through the bridge to Python.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

namespace rnnserve {

class Core;
std::unique_ptr<grpc::Service> make_rnnserve_service(Core* core);

}  // namespace rnnserve
