// A session as the shared store keeps it: one self-describing byte string per session.
//
// Layout (little-endian): "RNSS", format version (1 byte), 3 zero bytes, the next step index and
// the incarnation, each as 16 lowercase hex digits (fixed places, so the store's compare-and-set
// script compares them without decoding), the model name and version, the last reply (kept for
// an idempotent retry), the state floats, then a CRC-32 of everything before it. A record that is
// cut, altered or written by something else fails to decode with an error that says which, never
// a crash. Version 1 records (no incarnation: read as 0) are still read, and rewritten as
// version 2 by their next step.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "result.h"
#include "model.h"
#include "session.h"

namespace rnnserve {

constexpr char kRecordMagic[] = "RNSS\x02";  // magic + format version, as the script checks it
constexpr size_t kRecordIndexAt = 8, kRecordIndexLength = 16;
constexpr size_t kRecordIncarnationAt = kRecordIndexAt + kRecordIndexLength;

struct SessionRecord {
  std::string model;
  uint32_t version = 0;
  uint64_t next_index = 0;
  uint64_t incarnation = 0;  // which opening of the session id wrote it (0: a version 1 record)
  ReplyPtr last;  // null before the first step
  std::vector<float> state;
};

// The record's state and cached reply have the sizes this model's spec says (a replica serving
// other artifacts under the same name:version would otherwise read past their ends).
inline bool record_fits(const SessionRecord& r, const ModelSpec& m) {
  return r.state.size() == m.state_floats &&
         (!r.last || r.last->y.size() == size_t{r.last->steps} * static_cast<size_t>(m.output_size));
}

std::string index_text(uint64_t index);  // the 16 hex digits the record carries (index, incarnation)
std::string encode_record(const std::string& model, uint32_t version, uint64_t next_index, uint64_t incarnation,
                          const Reply* last, const std::vector<float>& state);
// What is wrong with a record ("fails its checksum (corrupt)", ...), or nothing: *out holds it.
std::optional<std::string> parse_record(const std::string& bytes, SessionRecord* out);
// Error (INTERNAL, naming the session and what is wrong) for a corrupt or foreign record.
Result<SessionRecord> decode_record(const std::string& bytes, const std::string& session_id);

}  // namespace rnnserve
