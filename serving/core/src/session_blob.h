// A session as it leaves one deployment for another (or for a checkpoint): ExportSession's blob.
//
// Layout (little-endian):
//   "RNSB", format version (1 byte), 3 zero bytes, the blob's whole length (u64);
//   the state tensors: count (u32), then per tensor its name (u32 length + UTF-8) and its shape
//   (u32 rank + u32 dims: PyTorch's (layers * directions, 1, hidden));
//   the session record (u32 length + session_record.h's encoding: model name and version, next
//   step index, the last reply (a retry's answer, Generate's starting point), the state floats in
//   the tensors' order, its own CRC-32);
//   SHA-256 of everything before it (32 bytes).
//
// SHA-256, not only the record's CRC-32: a blob lives outside the server, in files and other
// deployments, for as long as its owner keeps it, so the check must catch any change, not just
// the burst errors CRC-32 is built for; `head -c -32 blob | sha256sum` checks it with no rnnserve
// code. It proves integrity, not authorship: whoever holds a blob can write another.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "result.h"
#include "session_record.h"

namespace rnnserve {

struct BlobTensor {
  std::string name;
  std::vector<uint32_t> shape;
};

struct SessionBlob {
  std::vector<BlobTensor> tensors;
  SessionRecord record;
};

// The blob of a session whose gate is held (so its state is a step's whole result).
std::string encode_blob(Session& s);
// INVALID_ARGUMENT (field "blob"), saying what is wrong, for anything but an intact blob of this
// format whose parts agree with each other. Whether it fits a served model is the caller's check.
Result<SessionBlob> decode_blob(const std::string& bytes);
// FAILED_PRECONDITION naming both shapes when the blob's state tensors are not the model's.
std::optional<Error> blob_fits(const SessionBlob& blob, const ModelSpec& m);

}  // namespace rnnserve
