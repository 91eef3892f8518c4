// The Python binding: Python builds a Core, registers each model with its spec and its runner
// (the backend's step function, called once per batch with the GIL taken once), sets the bridge
// for the RPCs it answers itself, and starts it. Every blocking call releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <future>

#include "call.h"
#include "core.h"

namespace py = pybind11;
using namespace rnnserve;

namespace {

// A core thread (scheduler, bridge) keeps one Python thread state for its whole life. Without it
// each py::gil_scoped_acquire creates and frees one, and Python 3.11 maps and unmaps a frame stack
// with it: a munmap per model call, which interrupts the other core to flush its TLB.
// Freed when its thread ends, so threads that come and go (gRPC's pool grows and shrinks with
// load) do not leave one behind each; during interpreter shutdown Python frees them itself.
struct KeptThreadState {
  PyThreadState* state = nullptr;
  KeptThreadState() = default;
  KeptThreadState(const KeptThreadState&) = delete;
  KeptThreadState& operator=(const KeptThreadState&) = delete;
  ~KeptThreadState() {
    if (state == nullptr || !Py_IsInitialized() || _Py_IsFinalizing()) return;
    PyEval_RestoreThread(state);  // the GIL, with the state current
    PyThreadState_Clear(state);
    PyThreadState_DeleteCurrent();  // frees it and releases the GIL
  }
};

void keep_thread_state() {
  thread_local KeptThreadState kept;
  thread_local bool tried = false;
  if (tried) return;
  tried = true;
  if (PyGILState_GetThisThreadState() != nullptr) return;  // a Python thread: Python keeps its own
  kept.state = PyThreadState_New(PyInterpreterState_Main());
  kept.state->gilstate_counter = 1;  // our reference: pybind11's acquire/release pairs never free it
}

// The GIL, on a thread that keeps its Python thread state.
class Gil {
  struct Kept {
    Kept() { keep_thread_state(); }
  } kept_;  // first: the acquire below finds the kept state
  py::gil_scoped_acquire gil_;
};

template <class T>
T get(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) && !d[key].is_none() ? d[key].cast<T>() : fallback;
}

CoreConfig config_of(const py::dict& d) {
  CoreConfig c;
  c.address = get<std::string>(d, "address", c.address);
  c.max_batch = get<int>(d, "max_batch", c.max_batch);
  c.queue_delay_s = get<double>(d, "queue_delay_s", c.queue_delay_s);
  c.session_ttl_s = get<double>(d, "session_ttl_s", c.session_ttl_s);
  c.max_sessions = get<size_t>(d, "max_sessions", c.max_sessions);
  c.session_store = get<std::string>(d, "session_store", c.session_store);
  c.max_message_bytes = get<int>(d, "max_message_bytes", c.max_message_bytes);
  c.bridge_threads = get<int>(d, "bridge_threads", c.bridge_threads);
  c.tls_cert = get<std::string>(d, "tls_cert", "");
  c.tls_key = get<std::string>(d, "tls_key", "");
  c.tls_client_ca = get<std::string>(d, "tls_client_ca", "");
  c.max_concurrent_rpcs = get<size_t>(d, "max_concurrent_rpcs", c.max_concurrent_rpcs);
  c.access_log = get<bool>(d, "access_log", false);
  if (d.contains("access_sink") && !d["access_sink"].is_none()) {
    auto sink = std::make_shared<py::object>(d["access_sink"]);
    c.access_sink = [sink](const std::string& line) {
      Gil gil;
      try {
        (*sink)(line);
      } catch (py::error_already_set& e) {
        std::fprintf(stderr, "access log sink failed: %s\n", e.what());
      }
    };
  }
  if (d.contains("tokens") && !d["tokens"].is_none()) {
    for (const auto& entry : d["tokens"].cast<py::list>()) {
      auto pair = entry.cast<py::tuple>();
      c.token_digests.emplace_back(pair[0].cast<std::string>(), pair[1].cast<std::string>());
    }
  }
  return c;
}

Activation activation_of(const std::string& a) {
  if (a == "sigmoid") return Activation::kSigmoid;
  if (a == "softmax") return Activation::kSoftmax;
  if (a == "log_softmax") return Activation::kLogSoftmax;
  return Activation::kNone;
}

OutputKind output_kind_of(const std::string& k) {
  if (k == "classification") return OutputKind::kClassification;
  if (k == "next_token") return OutputKind::kNextToken;
  return OutputKind::kRegression;
}

ModelSpec spec_of(const py::dict& d) {
  ModelSpec m;
  m.name = d["name"].cast<std::string>();
  m.version = d["version"].cast<uint32_t>();
  m.tokens = d["input_kind"].cast<std::string>() == "tokens";
  m.input_name = d["input_name"].cast<std::string>();
  m.features = get<int>(d, "features", 0);
  m.vocab = get<std::vector<std::string>>(d, "vocab", {});
  m.max_steps = d["max_steps"].cast<uint32_t>();
  m.output_kind = output_kind_of(d["output_kind"].cast<std::string>());
  m.output_size = d["output_size"].cast<int>();
  m.activation = activation_of(d["activation"].cast<std::string>());
  m.labels = get<std::vector<std::string>>(d, "labels", {});
  m.streamable = d["streamable"].cast<bool>();
  for (const auto& s : d["states"].cast<py::list>()) {
    const auto sd = s.cast<py::dict>();
    m.states.push_back(StateSpec{sd["name"].cast<std::string>(), sd["layers"].cast<int>(), sd["size"].cast<int>(),
                                 sd["init"].cast<float>()});
  }
  return m;
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

void copy_checked(const FloatArray& a, const std::vector<py::ssize_t>& shape, const char* what, std::vector<float>* out) {
  std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
  if (got != shape) {
    auto str = [](const std::vector<py::ssize_t>& s) {
      std::string t = "(";
      for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
      return t + ")";
    };
    throw std::runtime_error(std::string("the model answered ") + what + " shaped " + str(got) + ", not " + str(shape));
  }
  out->assign(a.data(), a.data() + a.size());
}

// The backend's step(x, states) -> (y, states'), once per batch.
Runner runner_of(py::object step) {
  // a removed model version drops its runner on whichever thread lets go of it last
  std::shared_ptr<py::object> fn(new py::object(std::move(step)), [](py::object* o) {
    py::gil_scoped_acquire gil;
    delete o;
  });
  return [fn](const ModelSpec& m, Batch& b) {
    Gil gil;
    const auto rows = static_cast<py::ssize_t>(b.rows), t = static_cast<py::ssize_t>(b.steps);
    try {
      // views of the batch's buffers, not copies: they live for this call only (a backend keeps
      // no reference to its inputs), and a base object tells numpy that it does not own them
      const py::none unowned;
      py::array x = m.tokens ? py::array(py::array_t<int64_t>({rows, t}, b.ids.data(), unowned))
                             : py::array(py::array_t<float>({rows, t, static_cast<py::ssize_t>(m.features)},
                                                            b.features.data(), unowned));
      py::list states;
      for (size_t k = 0; k < m.states.size(); ++k) {
        const auto& s = m.states[k];
        states.append(py::array_t<float>({static_cast<py::ssize_t>(s.layers), rows, static_cast<py::ssize_t>(s.size)},
                                         b.states[k].data(), unowned));
      }
      py::tuple out = (*fn)(x, states);
      copy_checked(out[0].cast<FloatArray>(), {rows, t, static_cast<py::ssize_t>(m.output_size)}, "y", &b.y);
      auto new_states = out[1].cast<py::list>();
      if (new_states.size() != m.states.size()) throw std::runtime_error("the model answered the wrong number of states");
      for (size_t k = 0; k < m.states.size(); ++k) {
        const auto& s = m.states[k];
        copy_checked(new_states[k].cast<FloatArray>(),
                     {static_cast<py::ssize_t>(s.layers), rows, static_cast<py::ssize_t>(s.size)}, "a state", &b.states[k]);
      }
    } catch (py::error_already_set& e) {
      throw std::runtime_error(e.what());  // holds no Python object past the GIL
    }
  };
}

Bridge bridge_of(py::object handler) {
  auto fn = std::make_shared<py::object>(std::move(handler));
  return [fn](const std::string& method, const std::string& request, const std::string& identity,
              const Emit& emit) {
    BridgeReply reply;
    Gil gil;
    try {
      py::object emit_py = py::none();  // Python: emit(bytes) -> bool, called with the GIL
      if (emit) emit_py = py::cpp_function([emit](const py::bytes& m) { return emit(std::string(m)); });
      py::tuple r = (*fn)(method, py::bytes(request), identity, emit_py);
      reply.code = r[0].cast<int>();
      reply.message = r[1].cast<std::string>();
      reply.details = r[2].cast<std::string>();
      for (const auto& m : r[3].cast<py::list>()) reply.messages.push_back(m.cast<std::string>());
      reply.model = r[4].cast<std::string>();
    } catch (py::error_already_set& e) {
      reply = BridgeReply{static_cast<int>(grpc::StatusCode::INTERNAL), std::string("internal error: ") + e.what(), "", {}, ""};
    } catch (const std::exception& e) {  // a reply of the wrong shape: never terminate the bridge thread
      reply = BridgeReply{static_cast<int>(grpc::StatusCode::INTERNAL), std::string("internal error: ") + e.what(), "", {}, ""};
    }
    return reply;
  };
}

py::tuple error_tuple(const Error& e) {
  return py::make_tuple("error", reason(e.kind), e.message, e.field,
                        e.expected_index ? py::object(py::int_(*e.expected_index)) : py::object(py::none()));
}

// One step of a session from Python (Generate): blocks without the GIL until it is answered.
// The session's lookup without the GIL: with a shared store it may be a network round trip.
Result<SessionPtr> lookup(Core& core, const std::string& id) {
  py::gil_scoped_release nogil;
  return core.session(id);
}

py::tuple step(Core& core, const std::string& id, py::array x, std::optional<uint64_t> want) {
  auto found = lookup(core, id);
  if (!found.ok()) return error_tuple(found.error());
  const ModelSpec& m = *found.value()->model;
  // Generate's steps are the model's own outputs fed back, checked like any client's input
  auto input = [&]() -> Result<StepInput> {
    if (m.tokens) {
      auto ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>(x);
      return decode_tokens(m, std::vector<int64_t>(ids.data(), ids.data() + ids.size()));
    }
    auto f = FloatArray(x);
    const auto steps = static_cast<uint32_t>(f.size() / static_cast<size_t>(std::max(1, m.features)));
    return decode_features(m, std::vector<float>(f.data(), f.data() + f.size()), steps);
  }();
  if (!input.ok()) return error_tuple(input.error());
  // shared: the answering thread may still be inside set_value when this one wakes and returns
  auto answered = std::make_shared<std::promise<StepOutcome>>();
  auto outcome = answered->get_future();
  {
    py::gil_scoped_release nogil;
    core.stepper().step(found.value(), PendingStep{std::move(input.value()), want, [answered](StepOutcome o) {
                          answered->set_value(std::move(o));
                        }});
    outcome.wait();
  }
  StepOutcome o = outcome.get();
  if (!o.ok()) return error_tuple(o.error);
  py::array_t<float> y({static_cast<py::ssize_t>(o.reply->steps), static_cast<py::ssize_t>(m.output_size)});
  std::copy(o.reply->y.begin(), o.reply->y.end(), y.mutable_data());
  return py::make_tuple("ok", o.reply->step_index, y);
}

py::dict histogram(const Histogram& h) {
  py::dict d;
  d["bounds"] = h.bounds();
  d["counts"] = h.counts();
  d["sum"] = h.sum();
  return d;
}

py::dict metrics(Core& core) {
  py::dict out, models;
  py::list requests;
  for (const auto& [key, n] : core.metrics().requests()) requests.append(py::make_tuple(key.first, key.second, n));
  for (const auto& [name, m] : core.metrics().models()) {
    py::dict d;
    d["step_latency"] = histogram(m->step_latency);
    d["batch_size"] = histogram(m->batch_size);
    d["steps_ok"] = m->steps_ok.load();
    d["steps_failed"] = m->steps_failed.load();
    d["compute_ns"] = m->compute_ns.load();
    d["queue_ns"] = m->queue_ns.load();
    d["batches"] = m->batches.load();
    d["evicted"] = m->evicted.load();
    d["closed"] = m->closed.load();
    models[py::str(name)] = d;
  }
  out["requests"] = requests;
  py::list refused;
  for (const auto& [key, n] : core.metrics().refusals()) refused.append(py::make_tuple(key.first, key.second, n));
  out["refused"] = refused;
  out["models"] = models;
  return out;
}

// Python may drop a Core without stop(): stopping waits for in-flight batches and bridged calls,
// which need the GIL, so it runs without it; the delete then runs with it, as the runners and the
// bridge own Python objects.
struct StopThenDelete {
  void operator()(Core* core) const {
    {
      py::gil_scoped_release nogil;
      core->stop(0);
    }
    std::default_delete<Core>()(core);
  }
};
using CorePtr = std::unique_ptr<Core, StopThenDelete>;

}  // namespace

PYBIND11_MODULE(_native, mod) {
  mod.doc() = "rnnserve's native data plane (see serving/core/__init__.py)";
  route_protobuf_logs();
  py::class_<Core, CorePtr>(mod, "Core")
      .def(py::init([](const py::dict& cfg) { return CorePtr(std::make_unique<Core>(config_of(cfg)).release()); }))
      .def("add_model", [](Core& c, const py::dict& spec, py::object run) { c.add_model(spec_of(spec), runner_of(std::move(run))); })
      .def("set_bridge", [](Core& c, py::object handler) { c.set_bridge(bridge_of(std::move(handler))); })
      .def("start", &Core::start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &Core::stop, py::call_guard<py::gil_scoped_release>())
      .def("wait", &Core::wait, py::call_guard<py::gil_scoped_release>())
      .def("step", &step, py::arg("session_id"), py::arg("x"), py::arg("step_index") = py::none())
      .def("session", [](Core& c, const std::string& id) -> py::tuple {
        auto s = lookup(c, id);
        if (!s.ok()) return error_tuple(s.error());
        auto v = c.view(*s.value());
        ReplyPtr last;
        {
          std::lock_guard<std::mutex> lock(s.value()->mu);
          last = s.value()->last;
        }
        py::object last_y = py::none();  // the head output after the session's last step
        if (last && last->steps) {
          const auto o = static_cast<size_t>(s.value()->model->output_size);
          py::array_t<float> y(static_cast<py::ssize_t>(o));
          std::copy(last->y.end() - static_cast<std::ptrdiff_t>(o), last->y.end(), y.mutable_data());
          last_y = y;
        }
        return py::make_tuple("ok", v.model, v.version, v.next_step_index, v.expires_at, last_y);
      })
      .def("live_sessions", [](Core& c, const std::string& model) { return c.store().count(model); })
      .def("set_ready", [](Core& c, const std::string& name, uint32_t version, bool ready) -> py::tuple {
        auto err = c.set_ready(name, version, ready);
        return err ? error_tuple(*err) : py::make_tuple("ok");
      })
      .def("remove_model", [](Core& c, const std::string& name, uint32_t version) -> py::tuple {
        Result<size_t> left = [&] {
          py::gil_scoped_release nogil;  // joins the version's scheduler, whose batch may need the GIL
          return c.remove_model(name, version);
        }();
        return left.ok() ? py::make_tuple("ok", left.value()) : error_tuple(left.error());
      })
      .def("versions", [](Core& c) {
        py::list out;  // (name, version, ready, live sessions)
        for (const auto& v : c.versions()) out.append(py::make_tuple(v.spec->name, v.spec->version, v.ready, v.live_sessions));
        return out;
      })
      .def("metrics", &metrics);
}
