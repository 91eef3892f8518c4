#include "session_transfer.h"

#include "session_blob.h"
#include "text.h"

namespace rnnserve {

namespace {

// The gate is held.
Result<Exported> exported(Core& core, Session& s, bool close) {
  if (s.is_closed()) {
    return Error::of(ErrorKind::kSessionNotFound, "session " + py_repr(s.id) + " was closed while this call waited");
  }
  // A shared store's copy may be ahead of this replica's: export that one, or nothing.
  if (auto err = core.store().reload(s)) {
    if (s.is_closed()) return *err;  // gone from the store, or another opening of the id by now
    if (err->kind != ErrorKind::kUnavailable) return *err;
    return Error::of(ErrorKind::kUnavailable, "session " + py_repr(s.id) +
                                                  " could not be re-read from the shared session store (it is "
                                                  "unreachable); nothing was exported, retry");
  }
  Exported out{encode_blob(s), s.model->name, s.model->version, 0};
  {
    std::lock_guard<std::mutex> lock(s.mu);
    out.next_index = s.next_index;
  }
  if (close) {  // this opening only: a newer one of the id is another client's session
    if (auto err = core.store().close_opening(s)) return *err;
  }
  return out;
}

std::string model_text(const std::string& name, uint32_t version) {
  return "model " + py_repr(name) + (version ? " version " + std::to_string(version) : "");
}

std::string held(const SessionRecord& r) {
  return "the session blob holds a session of " + model_text(r.model, r.version);
}

Error not_served(const SessionRecord& r, const std::string& why) {
  return Error::of(ErrorKind::kModelMismatch, held(r) + ", which this server does not serve (" + why + ")");
}

// The blob's model and version are the ones the caller expects and this server serves.
Result<ModelPtr> served_model(Core& core, const SessionRecord& r, const ImportRequest& req) {
  if ((!req.model.empty() && req.model != r.model) || (req.version && req.version != r.version)) {
    const std::string expected = model_text(req.model.empty() ? r.model : req.model, req.version);
    return Error::of(ErrorKind::kModelMismatch, held(r) + "; this call expects " + expected);
  }
  auto m = core.model(r.model, r.version);
  if (!m.ok() || m.value()->version != r.version) {  // version 0 would name the latest
    return not_served(r, m.ok() ? "no version 0" : m.error().message);
  }
  return m;
}

}  // namespace

void export_session(Core& core, SessionPtr session, bool close, ExportDone done) {
  core.stepper().hold(session, [&core, session, close, done = std::move(done)]() mutable {
    auto work = [&core, session, close, done = std::move(done)] {
      auto result = exported(core, *session, close);
      core.stepper().release(session);
      done(std::move(result));
    };
    // The hold may come on a committer thread (the session's last step just landed); with a
    // shared store the export's re-read and close are round trips that must not stall batches.
    if (core.store().remote()) return core.bridge_pool().post(std::move(work));
    work();
  });
}

Result<SessionView> import_session(Core& core, const ImportRequest& req) {
  if (core.stopping()) return core.shutting_down();
  auto blob = decode_blob(req.blob);
  if (!blob.ok()) return blob.error();
  const SessionRecord& record = blob.value().record;
  auto m = served_model(core, record, req);
  if (!m.ok()) return m.error();
  if (auto err = blob_fits(blob.value(), *m.value())) return *err;
  auto opened = core.open_session(record.model, record.version, req.session_id, &record);
  // its version was freed during the import: the answer an import arriving a moment later gets
  const auto gone = [](ErrorKind k) { return k == ErrorKind::kVersionNotFound || k == ErrorKind::kModelNotFound; };
  if (!opened.ok() && gone(opened.error().kind)) {
    return not_served(record, opened.error().message);
  }
  return opened;
}

}  // namespace rnnserve
