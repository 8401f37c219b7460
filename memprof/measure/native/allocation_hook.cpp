// memprof's CPU allocation hook: the running tally of live CPU bytes per label, kept in C++.
//
// Why: the Python dispatch-mode tracker (memprof/measure/dispatch_tracker.py) pays one Python call per aten
// op (~8 us of PyTorch's own dispatch-mode cost plus memprof's work), 4-10% of a small CPU step.
// This hook wraps c10's CPU allocator instead (c10/core/CPUAllocator.h: SetCPUAllocator), so
// the tally changes inside the allocation and the free themselves: no Python per op, exactly the
// bytes the allocator hands out (a kernel's own scratch tensors included, which a dispatch mode
// does not see; see docs/profiler.md).
//
// Not counted either: blocks allocated inside a c10d collective (an op named c10d::*, seen by the
// RecordFunction callback below): a collective library's own staging. gloo's all_gather_into_tensor
// allocates a flat copy of the whole output on the calling thread (c10d::_allgather_base_ ->
// aten::empty, seen with torch.profiler on a ZeRO-1 bf16 step); NCCL gathers into the output, and
// its own buffers are outside PyTorch's allocator on a GPU, where memprof does not count them.
// The collectives' inputs and outputs are the caller's tensors and are counted.
//
// Counted: blocks allocated on the thread that started tracking (the training loop's; on CPU the
// autograd engine runs backward on it too), freed on any thread. Not counted: blocks other threads
// allocate, as a dispatch mode (thread-local) does not see them either; chiefly gloo's worker
// threads, whose collectives stage through flat scratch buffers (e.g. allgather) that NCCL on a
// GPU does not need, so counting them would make a CPU run unlike the GPU run it stands for.
//
// Same bookkeeping as tracker.py: every live allocation carries a label (location x category)
// and an allocation sequence number; the device total's peak keeps a copy of the tally; a budget
// crossed raises from inside the allocation; a large allocation asks Python for an ownership walk
// at the next top-level op (an aten op that is not nested in another), via a thread-local
// RecordFunction callback on the thread that started tracking.
//
// Owners: a block may also carry an owner index (given by Python's walks, -1 for none); the bytes
// per owner are kept beside the tally, and their copy at the peak is taken lazily, at the first
// owner change after a new peak (a free of an owned block, a walk), never per allocation: a new
// block has no owner until a walk names it, so allocations never change the owners' bytes.
#include <torch/extension.h>

#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

struct Rec {
  int64_t nbytes;
  int label;
  int64_t seq;
  int owner = -1;
};

struct Snap {
  std::vector<int64_t> tally;
  int64_t seq = 0;
};

struct State {
  std::mutex mu;
  std::unordered_map<void*, Rec> live;
  std::vector<int64_t> tally;
  int n_device_labels = 0;  // labels below this count towards the device total
  int64_t device_total = 0;
  int64_t peak_total = 0;
  int64_t seq = 0;
  Snap peak;
  int64_t peak_gen = 0;  // bumped at every new peak (and reset_peak)
  std::vector<int64_t> owner_tally;  // bytes per owner index
  std::vector<int64_t> owner_peak;  // owner_tally at the peak, valid while owner_peak_gen == peak_gen
  int64_t owner_peak_gen = -1;
  int new_label = 0;
  int64_t large_bytes = -1;  // < 0: no mid-phase walks
  std::vector<std::pair<void*, int64_t>> pending;  // (ptr, seq) of large allocations since the last walk
  int64_t budget = -1;  // < 0: none
  bool has_oom = false;
  Snap oom;
  int64_t oom_requested = 0;
  int64_t oom_total = 0;
  int64_t negative_clamps = 0;
  int64_t untracked_allocations = 0;  // allocations the wrapped allocator returned in a form we do not wrap
};

// Never destroyed: blocks allocated while tracking may be freed during interpreter teardown, after
// static destructors would have run (a destroyed mutex there aborts the process).
State& g = *new State();
std::atomic<bool> g_active{false};
std::atomic<bool> g_walk_due{false};
c10::Allocator* g_orig = nullptr;
c10::DeleterFnPtr g_orig_deleter = nullptr;
py::object* g_walk_callback = nullptr;  // leaked on purpose: must outlive interpreter teardown order
std::thread::id g_owner_thread;
at::CallbackHandle g_callback_handle = 0;
thread_local int t_depth = 0;  // nesting depth of FUNCTION-scope RecordFunctions on this thread
thread_local int t_in_collective = 0;  // c10d::* ops open on this thread

bool is_collective(const at::RecordFunction& fn) { return std::strncmp(fn.name(), "c10d::", 6) == 0; }

void sub_locked(int label, int64_t n) {
  int64_t v = g.tally[label] - n;
  if (v < 0) {
    g.negative_clamps += 1;
    n += v;
    v = 0;
  }
  g.tally[label] = v;
  if (label < g.n_device_labels) g.device_total -= n;
}

void maybe_new_peak_locked() {
  if (g.device_total > g.peak_total) {
    g.peak_total = g.device_total;
    g.peak.tally = g.tally;
    g.peak.seq = g.seq;
    g.peak_gen += 1;
  }
}

void grow(std::vector<int64_t>& v, int index) {
  if (index >= static_cast<int>(v.size())) v.resize(index + 1, 0);
}

// `delta` bytes to `owner`; at_peak_too: a block alive at the peak changes owner, so the peak's
// owners change as well (when no owner changed since the peak they are the tally's: nothing to copy)
void owner_add_locked(int owner, int64_t delta, bool at_peak_too) {
  if (owner < 0) return;
  if (at_peak_too) {
    if (g.owner_peak_gen == g.peak_gen) {
      grow(g.owner_peak, owner);
      g.owner_peak[owner] += delta;
    }
  } else if (g.owner_peak_gen != g.peak_gen) {  // the first owner change since a new peak
    g.owner_peak = g.owner_tally;
    g.owner_peak_gen = g.peak_gen;
  }
  grow(g.owner_tally, owner);
  g.owner_tally[owner] += delta;
}

void set_owner_locked(Rec& r, int owner, bool fix_peak) {
  if (owner == r.owner) return;
  const bool at_peak = fix_peak && r.seq <= g.peak.seq;
  owner_add_locked(r.owner, -r.nbytes, at_peak);
  owner_add_locked(owner, r.nbytes, at_peak);
  r.owner = owner;
}

void erase_locked(std::unordered_map<void*, Rec>::iterator it) {
  owner_add_locked(it->second.owner, -it->second.nbytes, false);
  sub_locked(it->second.label, it->second.nbytes);
  g.live.erase(it);
}

void tracked_delete(void* ptr) {
  if (ptr != nullptr) {
    std::lock_guard<std::mutex> lock(g.mu);
    auto it = g.live.find(ptr);
    if (it != g.live.end()) erase_locked(it);
  }
  g_orig_deleter(ptr);
}

struct TrackingAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = g_orig->allocate(n);
    if (!g_active.load(std::memory_order_relaxed) || d.get() == nullptr || n == 0) return d;
    if (std::this_thread::get_id() != g_owner_thread || t_in_collective > 0) return d;  // not counted (above)
    void* ptr = d.get();
    if (d.get_context() != ptr || !d.compare_exchange_deleter(g_orig_deleter, &tracked_delete)) {
      std::lock_guard<std::mutex> lock(g.mu);
      g.untracked_allocations += 1;
      return d;
    }
    bool over = false;
    int64_t total = 0;
    {
      std::lock_guard<std::mutex> lock(g.mu);
      auto stale = g.live.find(ptr);
      if (stale != g.live.end()) erase_locked(stale);  // a seeded block freed outside this allocator, reused
      const int64_t nb = static_cast<int64_t>(n);
      g.seq += 1;
      const int label = g.new_label;
      g.live.emplace(ptr, Rec{nb, label, g.seq, -1});
      g.tally[label] += nb;
      if (g.large_bytes >= 0 && nb >= g.large_bytes) {
        g.pending.emplace_back(ptr, g.seq);
        g_walk_due.store(true, std::memory_order_relaxed);
      }
      if (label < g.n_device_labels) {
        g.device_total += nb;
        maybe_new_peak_locked();
        if (g.budget >= 0 && g.device_total > g.budget && !g.has_oom) {
          g.has_oom = true;
          g.oom.tally = g.tally;
          g.oom.seq = g.seq;
          g.oom_requested = nb;
          g.oom_total = g.device_total;
          total = g.device_total;
          over = true;
        }
      }
    }
    if (over) {
      // d goes out of scope on the throw and frees the block through tracked_delete
      TORCH_CHECK_WITH(OutOfMemoryError, false, "memprof simulated out of memory: ", n,
                       " bytes requested, tracked device memory ", total, " bytes, over the budget of ",
                       g.budget, " bytes");
    }
    return d;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &tracked_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

TrackingAllocator& g_tracking_allocator = *new TrackingAllocator();  // never destroyed (see g)

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  if (is_collective(fn)) t_in_collective += 1;
  const int depth = t_depth++;
  if (depth == 0 && g_walk_due.load(std::memory_order_relaxed) && g_active.load(std::memory_order_relaxed) &&
      std::this_thread::get_id() == g_owner_thread) {
    g_walk_due.store(false, std::memory_order_relaxed);
    if (g_walk_callback != nullptr && !g_walk_callback->is_none()) {
      py::gil_scoped_acquire gil;
      try {
        (*g_walk_callback)();
      } catch (py::error_already_set& e) {
        e.restore();
        PyErr_WriteUnraisable(g_walk_callback->ptr());
      }
    }
  }
  return nullptr;
}

void on_op_end(const at::RecordFunction& fn, at::ObserverContext*) {
  t_depth = t_depth > 0 ? t_depth - 1 : 0;
  if (t_in_collective > 0 && is_collective(fn)) t_in_collective -= 1;
}

// ---- the Python interface (cold path: phase boundaries) -----------------------------------------

// Returns false (and installs nothing) when another CPU allocator of higher priority is in place.
bool start(int n_labels, int n_device_labels, int64_t budget, py::object walk_callback) {
  TORCH_CHECK(!g_active.load(), "memprof's allocation hook is already tracking");
  c10::Allocator* current = c10::GetCPUAllocator();
  TORCH_CHECK(current != &g_tracking_allocator, "memprof's allocation hook is already installed");
  c10::DeleterFnPtr deleter = current->raw_deleter();
  if (deleter == nullptr) return false;  // an allocator without a raw deleter cannot be wrapped
  {
    std::lock_guard<std::mutex> lock(g.mu);
    g.live.clear();
    g.tally.assign(n_labels, 0);
    g.n_device_labels = n_device_labels;
    g.device_total = g.peak_total = g.seq = 0;
    g.peak = Snap{g.tally, 0};
    g.peak_gen = 0;
    g.owner_tally.clear();
    g.owner_peak.clear();
    g.owner_peak_gen = -1;
    g.new_label = n_device_labels - 1;
    g.large_bytes = -1;
    g.pending.clear();
    g.budget = budget;
    g.has_oom = false;
    g.oom = Snap{};
    g.negative_clamps = 0;
    g.untracked_allocations = 0;
  }
  g_orig = current;
  g_orig_deleter = deleter;
  c10::SetCPUAllocator(&g_tracking_allocator, /*priority=*/200);
  if (c10::GetCPUAllocator() != &g_tracking_allocator) return false;
  if (g_walk_callback == nullptr) g_walk_callback = new py::object();
  *g_walk_callback = walk_callback;
  g_owner_thread = std::this_thread::get_id();
  t_depth = 0;
  t_in_collective = 0;
  g_walk_due.store(false);
  // always on (about 0.2 us per op): it finds the collectives, and the moment of mid-phase walks
  g_callback_handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback(&on_op_start, &on_op_end).scopes({at::RecordScope::FUNCTION}));
  g_active.store(true);
  return true;
}

void stop() {
  g_active.store(false);
  // drop the walk callback now (the GIL is held here): kept, it would keep the profiler, and through
  // it the engine and its process group, alive past interpreter shutdown, where tearing them down is
  // no longer orderly
  if (g_walk_callback != nullptr) *g_walk_callback = py::none();
  if (c10::GetCPUAllocator() == &g_tracking_allocator) c10::SetCPUAllocator(g_orig, /*priority=*/200);
  if (g_callback_handle != 0) {
    at::removeCallback(g_callback_handle);
    g_callback_handle = 0;
  }
  g_walk_due.store(false);
  // blocks allocated while tracking keep tracked_delete as their deleter: it forwards to g_orig_deleter
}

bool installed() { return g_active.load(); }

// A block that exists already (seeded): counted under `label`; its free is reported by Python
// (weak reference on its storage) through `forget`, since its deleter is not ours.
// Returns its sequence number, 0 when it is counted already (or empty).
int64_t seed(uintptr_t ptr, int64_t nbytes, int label) {
  std::lock_guard<std::mutex> lock(g.mu);
  void* p = reinterpret_cast<void*>(ptr);
  if (nbytes <= 0 || p == nullptr || g.live.count(p)) return 0;
  g.seq += 1;
  g.live.emplace(p, Rec{nbytes, label, g.seq, -1});
  g.tally[label] += nbytes;
  if (label < g.n_device_labels) {
    g.device_total += nbytes;
    maybe_new_peak_locked();  // a block seeded while tracking (resync) is live memory now
  }
  return g.seq;
}

// The label of the live block at ptr allocated at seq, or -1.
int label_of(uintptr_t ptr, int64_t seq) {
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.live.find(reinterpret_cast<void*>(ptr));
  return (it == g.live.end() || it->second.seq != seq) ? -1 : it->second.label;
}

// The seeded block at ptr, allocated at seq, died (its storage's weak reference fired).
void forget(uintptr_t ptr, int64_t seq) {
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.live.find(reinterpret_cast<void*>(ptr));
  if (it == g.live.end() || it->second.seq != seq) return;
  erase_locked(it);
}

// A seeded block's size changed outside the allocator (UntypedStorage.resize_ keeps its pointer only
// when it allocates anew, so this is rare): the tally follows.
void resize_seeded(uintptr_t ptr, int64_t seq, int64_t nbytes) {
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.live.find(reinterpret_cast<void*>(ptr));
  if (it == g.live.end() || it->second.seq != seq || it->second.nbytes == nbytes) return;
  Rec& r = it->second;
  const int64_t delta = nbytes - r.nbytes;
  owner_add_locked(r.owner, delta, false);
  r.nbytes = nbytes;
  if (delta < 0) {
    sub_locked(r.label, -delta);
  } else {
    g.tally[r.label] += delta;
    if (r.label < g.n_device_labels) g.device_total += delta;
    maybe_new_peak_locked();
  }
}

void set_new_label(int label) {
  std::lock_guard<std::mutex> lock(g.mu);
  g.new_label = label;
}

void set_large_bytes(int64_t n) {
  std::lock_guard<std::mutex> lock(g.mu);
  g.large_bytes = n;
  if (n < 0) {
    g.pending.clear();
    g_walk_due.store(false);
  }
}

void reset_peak() {
  std::lock_guard<std::mutex> lock(g.mu);
  g.peak_total = g.device_total;
  g.peak.tally = g.tally;
  g.peak.seq = g.seq;
  g.peak_gen += 1;
}

// Bytes per owner index at the current peak.
std::vector<int64_t> peak_owners() {
  std::lock_guard<std::mutex> lock(g.mu);
  return g.owner_peak_gen == g.peak_gen ? g.owner_peak : g.owner_tally;
}

py::tuple state() {
  std::lock_guard<std::mutex> lock(g.mu);
  return py::make_tuple(g.tally, g.device_total, g.seq, g.negative_clamps, g.untracked_allocations,
                        static_cast<int64_t>(g.live.size()));
}

py::tuple peak() {
  std::lock_guard<std::mutex> lock(g.mu);
  return py::make_tuple(g.peak.tally, g.peak.seq, g.peak_total);
}

py::object oom() {
  std::lock_guard<std::mutex> lock(g.mu);
  if (!g.has_oom) return py::none();
  return py::make_tuple(g.oom.tally, g.oom.seq, g.oom_requested, g.oom_total, g.budget);
}

void move_locked(Rec& r, int new_label, bool fix_peak, bool fix_oom) {
  sub_locked(r.label, r.nbytes);
  g.tally[new_label] += r.nbytes;
  if (new_label < g.n_device_labels) g.device_total += r.nbytes;
  auto fix = [&](Snap& s) {
    if (r.seq <= s.seq) {
      s.tally[r.label] = std::max<int64_t>(0, s.tally[r.label] - r.nbytes);
      s.tally[new_label] += r.nbytes;
    }
  };
  if (fix_peak) fix(g.peak);
  if (fix_oom && g.has_oom) fix(g.oom);
  r.label = new_label;
  maybe_new_peak_locked();
}

// The live block at ptr, allocated just now by code that names it (FSDP2 re-gathering a parameter into
// a storage the hook allocates, its flat all-gather output), takes `label`: in the tally and in the
// peak and OOM snapshots taken since it was allocated. Returns false when no block lives at ptr.
bool label_block(uintptr_t ptr, int label) {
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.live.find(reinterpret_cast<void*>(ptr));
  if (it == g.live.end()) return false;
  if (it->second.label != label) move_locked(it->second, label, /*fix_peak=*/true, /*fix_oom=*/true);
  return true;
}

// Relabel every live block: an owned one (ptr in `owned`) takes its owner's label, and its owner
// index from `owners` (-1 where absent); an unowned one whose label is in `unowned_map` takes the
// mapped label and loses its owner. Snapshots (peak / oom) are fixed for the blocks alive at them
// (the owners at the peak with the peak). Returns the owned pointers that are not live here.
std::vector<uintptr_t> relabel(const std::unordered_map<uintptr_t, int>& owned,
                               const std::unordered_map<int, int>& unowned_map, bool fix_peak, bool fix_oom,
                               const std::unordered_map<uintptr_t, int>& owners) {
  std::lock_guard<std::mutex> lock(g.mu);
  size_t found = 0;
  for (auto& [ptr, r] : g.live) {
    auto o = owned.find(reinterpret_cast<uintptr_t>(ptr));
    int new_label = r.label;
    int new_owner = r.owner;
    if (o != owned.end()) {
      new_label = o->second;
      auto w = owners.find(reinterpret_cast<uintptr_t>(ptr));
      new_owner = w == owners.end() ? -1 : w->second;
      found += 1;
    } else {
      auto m = unowned_map.find(r.label);
      if (m != unowned_map.end() && m->second != r.label) {
        new_label = m->second;
        new_owner = -1;
      }
    }
    set_owner_locked(r, new_owner, fix_peak);
    if (new_label != r.label) move_locked(r, new_label, fix_peak, fix_oom);
  }
  g.pending.clear();
  std::vector<uintptr_t> missing;
  if (found < owned.size()) {
    for (const auto& [ptr, label] : owned) {
      if (!g.live.count(reinterpret_cast<void*>(ptr))) missing.push_back(ptr);
    }
  }
  return missing;
}

// Label the pending large blocks that have an owner now (and give them its index from `owners`),
// in the tally and the current peak.
void relabel_pending(const std::unordered_map<uintptr_t, int>& owned, const std::unordered_map<uintptr_t, int>& owners) {
  std::lock_guard<std::mutex> lock(g.mu);
  std::vector<std::pair<void*, int64_t>> still;
  for (const auto& [ptr, seq] : g.pending) {
    auto it = g.live.find(ptr);
    if (it == g.live.end() || it->second.seq != seq) continue;  // freed already: keeps its label
    auto o = owned.find(reinterpret_cast<uintptr_t>(ptr));
    if (o == owned.end()) {
      still.emplace_back(ptr, seq);
      continue;
    }
    auto w = owners.find(reinterpret_cast<uintptr_t>(ptr));
    set_owner_locked(it->second, w == owners.end() ? -1 : w->second, /*fix_peak=*/true);
    if (o->second != it->second.label) move_locked(it->second, o->second, /*fix_peak=*/true, /*fix_oom=*/false);
  }
  g.pending.swap(still);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memprof's CPU allocation hook (see memprof/measure/allocation_hook_tracker.py)";
  m.def("start", &start);
  m.def("stop", &stop);
  m.def("installed", &installed);
  m.def("seed", &seed);
  m.def("forget", &forget);
  m.def("label_of", &label_of);
  m.def("resize_seeded", &resize_seeded);
  m.def("label_block", &label_block);
  m.def("set_new_label", &set_new_label);
  m.def("set_large_bytes", &set_large_bytes);
  m.def("reset_peak", &reset_peak);
  m.def("state", &state);
  m.def("peak", &peak);
  m.def("peak_owners", &peak_owners);
  m.def("oom", &oom);
  m.def("relabel", &relabel);
  m.def("relabel_pending", &relabel_pending);
}
