#include "errors.h"

#include <utility>

#include "wire.h"

namespace rnnserve {

Error Error::invalid(std::string message, std::string field) {
  return Error{ErrorKind::kInvalidInput, std::move(message), std::move(field), std::nullopt};
}

Error Error::too_large(std::string message, std::string field) {
  return Error{ErrorKind::kPayloadTooLarge, std::move(message), std::move(field), std::nullopt};
}

Error Error::of(ErrorKind kind, std::string message) {
  return Error{kind, std::move(message), "", std::nullopt};
}

Error Error::out_of_order(const std::string& field, uint64_t got, const std::string& what, uint64_t expected,
                          const std::string& why) {
  std::string message = field + " " + std::to_string(got) + " is out of order for " + what + ": expected " +
                        std::to_string(expected);
  if (expected) message += " (or " + std::to_string(expected - 1) + " to retry the last step)";
  return Error{ErrorKind::kStepOutOfOrder, message + why, "", expected};
}

grpc::StatusCode grpc_code(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidInput:
    case ErrorKind::kPayloadTooLarge:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case ErrorKind::kModelNotFound:
    case ErrorKind::kVersionNotFound:
    case ErrorKind::kSessionNotFound:
    case ErrorKind::kSessionExpired:
      return grpc::StatusCode::NOT_FOUND;
    case ErrorKind::kSessionExists:
      return grpc::StatusCode::ALREADY_EXISTS;
    case ErrorKind::kNotStreamable:
    case ErrorKind::kModelMismatch:
    case ErrorKind::kStepOutOfOrder:
      return grpc::StatusCode::FAILED_PRECONDITION;
    case ErrorKind::kCapacityExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case ErrorKind::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
    case ErrorKind::kUnauthenticated:
      return grpc::StatusCode::UNAUTHENTICATED;
    case ErrorKind::kInternal:
      return grpc::StatusCode::INTERNAL;
  }
  return grpc::StatusCode::INTERNAL;
}

const char* reason(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidInput: return "INVALID_INPUT";
    case ErrorKind::kPayloadTooLarge: return "PAYLOAD_TOO_LARGE";
    case ErrorKind::kModelNotFound: return "MODEL_NOT_FOUND";
    case ErrorKind::kVersionNotFound: return "VERSION_NOT_FOUND";
    case ErrorKind::kSessionNotFound: return "SESSION_NOT_FOUND";
    case ErrorKind::kSessionExpired: return "SESSION_EXPIRED";
    case ErrorKind::kSessionExists: return "SESSION_EXISTS";
    case ErrorKind::kNotStreamable: return "NOT_STREAMABLE";
    case ErrorKind::kModelMismatch: return "MODEL_MISMATCH";
    case ErrorKind::kStepOutOfOrder: return "STEP_OUT_OF_ORDER";
    case ErrorKind::kCapacityExhausted: return "CAPACITY_EXHAUSTED";
    case ErrorKind::kUnavailable: return "UNAVAILABLE";
    case ErrorKind::kUnauthenticated: return "UNAUTHENTICATED";
    case ErrorKind::kInternal: return "INTERNAL";
  }
  return "INTERNAL";
}

const char* code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

namespace {

constexpr size_t kMaxMessage = 1024;  // characters; see rich_status

// Python's message[:1023] + "…" on code points, so a clipped message stays valid UTF-8.
std::string clipped(const std::string& message) {
  size_t points = 0;
  for (unsigned char c : message) points += (c & 0xC0) != 0x80;
  if (points <= kMaxMessage) return message;
  size_t kept = 0, at = 0;
  for (; at < message.size(); ++at) {
    if ((static_cast<unsigned char>(message[at]) & 0xC0) != 0x80 && kept++ == kMaxMessage - 1) break;
  }
  return message.substr(0, at) + "\xE2\x80\xA6";
}

std::string any(std::string_view type, const std::string& value) {
  Wire w;
  w.string(1, std::string("type.googleapis.com/") + std::string(type));
  w.bytes(2, value);
  return w.take();
}

std::string error_info(const Error& err) {
  Wire w;
  w.string(1, reason(err.kind));
  w.string(2, "rnnserve.v1");
  auto entry = [&w](const std::string& key, const std::string& value) {
    Wire e;
    e.string(1, key);
    e.string(2, value);
    w.bytes(3, e.take());
  };
  if (err.expected_index) entry("expected_step_index", std::to_string(*err.expected_index));
  if (!err.field.empty()) entry("field", err.field);
  return w.take();
}

std::string bad_request(const Error& err, const std::string& message) {
  Wire violation;
  violation.string(1, err.field.empty() ? "input" : err.field);
  violation.string(2, message);
  Wire w;
  w.bytes(1, violation.take());
  return w.take();
}

bool is_bad_input(ErrorKind kind) {
  return kind == ErrorKind::kInvalidInput || kind == ErrorKind::kPayloadTooLarge;
}

}  // namespace

grpc::Status rich_status(const Error& err) {
  const grpc::StatusCode code = grpc_code(err.kind);
  const std::string message = clipped(err.message);
  Wire status;
  status.varint(1, static_cast<uint64_t>(code));
  status.string(2, message);
  status.bytes(3, any("google.rpc.ErrorInfo", error_info(err)));
  if (is_bad_input(err.kind)) {
    status.bytes(3, any("google.rpc.BadRequest", bad_request(err, message)));
  }
  return grpc::Status(code, message, status.take());
}

grpc::Status plain_status(const Error& err) { return grpc::Status(grpc_code(err.kind), err.message); }

}  // namespace rnnserve
