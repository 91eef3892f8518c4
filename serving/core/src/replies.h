// rnnserve.v1 messages ↔ the core's arrays: Input decoding and Output in the model's own terms
// (serving/grpc_api.py's decode_input and OutputRows, same checks, same numbers).
#pragma once

#include "codec.h"
#include "rnnserve/v1/rnnserve.pb.h"
#include "session.h"

namespace rnnserve {

constexpr uint32_t kDefaultTopK = 5;

Result<StepInput> decode_input(const ModelSpec& m, const rnnserve::v1::Input& input);
// reply.outputs (one per time step) and, for next-token models, reply.text.
void fill_reply(const ModelSpec& m, const Reply& r, uint32_t top_k, rnnserve::v1::StepResponse* reply);
rnnserve::v1::Error error_message(const Error& err);

}  // namespace rnnserve
