// Moving a session: ExportSession and ImportSession over the core's session store.
//
// An export takes the session's gate in line with its steps (Stepper::hold), so the blob holds a
// step's whole result, never half of one; with a shared store it first re-reads the session
// (another replica may have advanced it). A move closes the session in that same hold, so no step
// lands between the blob and the close. An import opens a session through the store like
// OpenSession (capacity and id rules alike) with the blob's state, index and last reply.
#pragma once

#include <functional>
#include <string>

#include "core.h"

namespace rnnserve {

struct Exported {
  std::string blob;
  std::string model;
  uint32_t version = 0;
  uint64_t next_index = 0;
};
using ExportDone = std::function<void(Result<Exported>)>;

// `done` runs once, on whichever thread hands the gate over (at once when it is free).
void export_session(Core& core, SessionPtr session, bool close, ExportDone done);

struct ImportRequest {
  std::string blob;
  std::string session_id;  // empty: a fresh one
  std::string model;       // empty: any
  uint32_t version = 0;    // 0: any
};
Result<SessionView> import_session(Core& core, const ImportRequest& request);

}  // namespace rnnserve
