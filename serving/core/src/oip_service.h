// The Open Inference Protocol (KServe v2 / Triton) natively: ModelInfer and ModelStreamInfer with
// Triton's sequence extension, as serving/oip_api.py answers them (same checks, same messages),
// and Triton's ModelStatistics of the requests served here. The other methods of
// inference.GRPCInferenceService (health, metadata, Triton's configuration and repository index)
// go through the bridge to Python, and so does a stateless request of a model that reads whole
// sequences (bidirectional): Python runs its sequence graph. oip_codec.h decodes and encodes the
// messages; oip_stats.h keeps the statistics.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

namespace rnnserve {

class Core;
std::unique_ptr<grpc::Service> make_oip_service(Core* core);

}  // namespace rnnserve
