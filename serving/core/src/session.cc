#include "session.h"

#include <chrono>

#include "session_record.h"
#include "text.h"

namespace rnnserve {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Session::Session(std::string session_id, ModelPtr spec)
    : id(std::move(session_id)), model(std::move(spec)), last_used_ns(now_ns()) {
  reset_state();
}

void Session::reset_state() {
  state.resize(model->state_floats);
  size_t at = 0;
  for (const auto& s : model->states) {
    std::fill(state.begin() + static_cast<std::ptrdiff_t>(at),
              state.begin() + static_cast<std::ptrdiff_t>(at + s.floats()), s.init);
    at += s.floats();
  }
}

Error session_reopened(const std::string& id) {
  return Error::of(ErrorKind::kUnavailable,
                   "session " + py_repr(id) + " was closed and opened again (perhaps on another replica) while this ran; retry");
}

bool Session::is_closed() {
  std::lock_guard<std::mutex> lock(mu);
  return closed;
}

void Session::restore(const SessionRecord& record) {
  std::lock_guard<std::mutex> lock(mu);
  next_index = record.next_index;
  last = record.last;
  state = record.state;
}

}  // namespace rnnserve
