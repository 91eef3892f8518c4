// OIP requests ↔ the core's arrays, with the checks and messages of serving/oip_api.py: Triton's
// sequence parameters, model versions, the one input tensor (FP32 features, INT64/INT32 tokens,
// or one BYTES string), the requested outputs and the raw-form reply.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "codec.h"
#include "inference/grpc_service.pb.h"
#include "model.h"
#include "result.h"

namespace rnnserve::oip {

struct SequenceId {
  std::string text;  // decimal for integer ids
  bool is_string = false;
  std::string repr() const;  // as Python's repr() of the id
};

struct SequenceControl {
  std::optional<SequenceId> id;  // none: stateless
  bool start = false, end = false;
  // rnnserve's sequence_step_index: the step's number, as rnnserve.v1's step_index (a retry of the
  // last answered index gets its stored reply); none: "the next step", as in Triton.
  std::optional<uint64_t> step_index;
};

// sequence_id (int64, uint64 or string; 0 / "" = none), sequence_start, sequence_end and
// sequence_step_index (int64 ≥ 0 or uint64; only with a sequence_id, and 0 with a start).
Result<SequenceControl> sequence_control(const inference::ModelInferRequest& r);
// The session of a Triton sequence: oip:<model>:<id>, or oip:<identity>:<model>:<id> with
// authentication on. Sequence ids are chosen by clients, so each identity has its own namespace
// (identities hold no colon): one caller can neither step nor end another's sequence 7. Without
// authentication every client shares one namespace, as in Triton.
std::string session_id_for(const std::string& identity, const std::string& model, const SequenceId& id);
// What a stream chains a request under: 7 and "7" name one sequence. Empty: no sequence (or
// parameters that the request's answer refuses).
std::string sequence_key(const std::string& identity, const inference::ModelInferRequest& r);
// '' = latest (none); otherwise a positive integer of at most 18 ASCII digits, as decimal text
// without leading zeros (a version past 32 bits is simply not loaded).
Result<std::optional<std::string>> parse_version(const std::string& text);

std::string expected_inputs(const ModelSpec& m);  // what the model takes, in words
using Rows = std::vector<StepInput>;
// The request's one input tensor → one validated row per batch row: (T, F) or (T,).
Result<Rows> decode_rows(const ModelSpec& m, const inference::ModelInferRequest& r);

struct Wanted {
  std::string name;
  int64_t classes = 0;  // Triton's classification count; 0 = the tensor itself
};
// Every output when the request names none; a name asked twice keeps its first place.
Result<std::vector<Wanted>> requested_outputs(const inference::ModelInferRequest& r, const ModelSpec& m);
// Refuses, before any work, a reply that could not be sent (gRPC checks only once it is built).
std::optional<Error> check_reply_size(const inference::ModelInferRequest& r, const ModelSpec& m, const Rows& rows,
                                      const std::vector<Wanted>& wanted, uint64_t limit);
// y (B, T, O) → the reply's outputs in the order wanted, raw form.
void fill_outputs(const ModelSpec& m, std::vector<float> y, int64_t rows, int64_t steps,
                  const std::vector<Wanted>& wanted, inference::ModelInferResponse* reply);

// A status message clipped to 1,024 characters: messages echo client values, and past gRPC's
// metadata limit the client would get "Stream removed" instead of the status.
std::string clipped(const std::string& message);

}  // namespace rnnserve::oip
