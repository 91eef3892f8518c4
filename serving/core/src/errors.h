// The one error table of the native core: every domain error a client can cause, its gRPC code,
// its stable reason word and (for bridged HTTP users) its HTTP status. Mirrors serving/errors.py,
// which stays the table for the Python control plane; tests hold the two to the same answers.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <optional>
#include <string>

namespace rnnserve {

enum class ErrorKind {
  kInvalidInput,
  kPayloadTooLarge,
  kModelNotFound,
  kVersionNotFound,
  kSessionNotFound,
  kSessionExpired,
  kSessionExists,
  kNotStreamable,
  kModelMismatch,
  kStepOutOfOrder,
  kCapacityExhausted,
  kUnavailable,
  kUnauthenticated,
  kInternal,
};

struct Error {
  ErrorKind kind = ErrorKind::kInternal;
  std::string message;
  std::string field;                      // InvalidInput: the request field at fault
  std::optional<uint64_t> expected_index;  // StepOutOfOrder: the index the server expected

  static Error invalid(std::string message, std::string field = "");
  static Error too_large(std::string message, std::string field);
  static Error of(ErrorKind kind, std::string message);
  // "<field> <got> is out of order for <what>: expected <expected> (or <expected - 1> to retry
  // the last step)<why>": one wording for every API and store that refuses an index.
  static Error out_of_order(const std::string& field, uint64_t got, const std::string& what, uint64_t expected,
                            const std::string& why = "");
};

grpc::StatusCode grpc_code(ErrorKind kind);
const char* reason(ErrorKind kind);
const char* code_name(grpc::StatusCode code);  // "NOT_FOUND", as grpc's Python StatusCode.name

// rnnserve.v1's status: the message (clipped to 1,024 characters, as it travels in headers twice)
// plus a google.rpc.Status detail carrying ErrorInfo and, for bad input, a BadRequest.
grpc::Status rich_status(const Error& err);
// The OIP answers plain statuses, as Triton does.
grpc::Status plain_status(const Error& err);

}  // namespace rnnserve
