// The CUDA emulation's runtime (include/dspark/emulate/runtime.h): blocks run one after
// another; the threads of a block are ucontext fibers scheduled round-robin, each running
// until it has to wait for others at a barrier or warp collective.
//
// Sanitizers: the fiber switches are announced to AddressSanitizer
// (__sanitizer_{start,finish}_switch_fiber) and ThreadSanitizer (__tsan_switch_to_fiber, no
// implied synchronisation); the runtime's own bookkeeping is hidden from ThreadSanitizer
// (__tsan_ignore_thread_begin/end), which sees only the synchronisation CUDA defines:
// barrier and __syncwarp (release on arrival, acquire on departure), the end of a launch,
// and the kernel's own atomics. The hooks are weak symbols, present when the process runs
// with a sanitizer runtime, so this file is built the same way for every build.
#include "dspark/emulate/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void* __tsan_get_current_fiber() __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __tsan_ignore_thread_begin() __attribute__((weak));
void __tsan_ignore_thread_end() __attribute__((weak));
void AnnotateNewMemory(const char* file, int line, const volatile void* mem, size_t size) __attribute__((weak));
// The __shared__ variables of the kernels (device.h puts them in this section).
extern char __start_dspark_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_dspark_shared[] __attribute__((weak, visibility("hidden")));
}

namespace dspark::emulate {

thread_local const ThreadInfo* current_thread = nullptr;

namespace {

constexpr unsigned kTsanNoSync = 1u;           // __tsan_switch_to_fiber_no_sync
constexpr std::size_t kMaxExchangeBytes = 64;  // per lane and collective
constexpr unsigned char kSharedGarbage = 0xFF; // uninitialised shared memory: NaN, -1

std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("DSPARK_EMULATE_STACK_KB");
    const long kb = env ? std::atol(env) : 256;
    return static_cast<std::size_t>(std::max(64L, kb)) * 1024;
  }();
  return bytes;
}

// Seconds a launch may run before the watchdog ends the process (a kernel that never
// reaches a barrier, for example spinning on a flag another block would set).
int time_limit_seconds() {
  static const int seconds = [] {
    const char* env = std::getenv("DSPARK_EMULATE_TIMEOUT_S");
    return env ? std::max(1, std::atoi(env)) : 300;
  }();
  return seconds;
}

std::string where_string(Location where) {
  const char* file = where.file ? where.file : "?";
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(where.line);
}

bool same_location(Location a, Location b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", mask);
  return text;
}

// A fiber stack with a PROT_NONE guard page below it (an overflow faults instead of
// corrupting the neighbour).
struct Stack {
  char* base = nullptr;  // guard page
  std::size_t bytes = 0;
  char* bottom() const { return base + page(); }
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  explicit Stack(std::size_t size) : bytes(size) {
    void* p = mmap(nullptr, bytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("dspark emulation: cannot map a fiber stack");
    base = static_cast<char*>(p);
    mprotect(base, page(), PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base, bytes + page()); }
};

enum class State { kRunnable, kWaiting, kDone, kFailed };

struct Fiber {
  ThreadInfo info;
  ucontext_t context;
  Stack* stack = nullptr;
  State state = State::kRunnable;
  std::string waiting_at;  // for deadlock reports
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
  int tsan_ignores = 0;  // open __tsan_ignore_thread_begin of this fiber
};

// One meeting of threads: a block barrier or a warp collective. Its address is the
// ThreadSanitizer synchronisation object of that meeting.
struct Meeting {
  const char* what;
  unsigned mask;  // warp collectives: the member lanes
  Location where;
  std::size_t bytes;
  bool orders_memory;
  unsigned arrived_lanes = 0;
  int arrived = 0;
  std::vector<Fiber*> waiters;
  unsigned char values[32][kMaxExchangeBytes];
};

struct Block {
  const char* kernel_name;
  uint3 index;
  std::vector<Fiber> fibers;
  unsigned num_threads = 0;
  std::shared_ptr<Meeting> barrier;
  std::vector<std::vector<std::shared_ptr<Meeting>>> warp_meetings;  // per warp, open meetings
  std::string error;
};

// Scheduler state of the OS thread that runs a launch.
thread_local Block* tls_block = nullptr;
thread_local Fiber* tls_fiber = nullptr;  // the fiber running now
thread_local ucontext_t tls_scheduler_context;
thread_local void* tls_scheduler_tsan_fiber = nullptr;
thread_local const void* tls_scheduler_stack_bottom = nullptr;
thread_local std::size_t tls_scheduler_stack_size = 0;
thread_local const std::function<void()>* tls_body = nullptr;
char launch_end_token;  // ThreadSanitizer: the end of every thread of a launch happens before its return

// The runtime's own memory accesses are hidden from ThreadSanitizer. Ignores are counted
// per fiber, so that a fiber abandoned inside one can be closed before it is destroyed.
void tsan_ignore_begin() {
  if (!__tsan_ignore_thread_begin) return;
  __tsan_ignore_thread_begin();
  if (tls_fiber) ++tls_fiber->tsan_ignores;
}

void tsan_ignore_end() {
  if (!__tsan_ignore_thread_end) return;
  if (tls_fiber) --tls_fiber->tsan_ignores;  // still ignored
  __tsan_ignore_thread_end();
}

struct TsanIgnore {
  TsanIgnore() { tsan_ignore_begin(); }
  ~TsanIgnore() { tsan_ignore_end(); }
};

std::string block_string(const Block& block) {
  return "(" + std::to_string(block.index.x) + "," + std::to_string(block.index.y) + "," +
         std::to_string(block.index.z) + ")";
}

// Fiber side: give control back to the scheduler; returns when the scheduler resumes us.
void switch_to_scheduler(bool finished) {
  Fiber* self = tls_fiber;
  if (__sanitizer_start_switch_fiber)
    __sanitizer_start_switch_fiber(finished ? nullptr : &self->asan_fake_stack, tls_scheduler_stack_bottom,
                                   tls_scheduler_stack_size);
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
  swapcontext(&self->context, &tls_scheduler_context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(self->asan_fake_stack, nullptr, nullptr);
}

void fiber_entry() {
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(nullptr, &tls_scheduler_stack_bottom, &tls_scheduler_stack_size);
  Fiber* self = tls_fiber;
  try {
    (*tls_body)();
  } catch (const std::exception& e) {
    if (tls_block->error.empty()) tls_block->error = std::string("a thread threw: ") + e.what();
  }
  tsan_ignore_begin();
  if (__tsan_release) __tsan_release(&launch_end_token);
  self->state = State::kDone;
  tsan_ignore_end();
  switch_to_scheduler(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

// Scheduler side: run fiber f until it waits, finishes or fails.
void resume(Fiber& f) {
  tls_fiber = &f;
  current_thread = &f.info;
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&fake_stack, f.stack->bottom(), f.stack->bytes);
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
  swapcontext(&tls_scheduler_context, &f.context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
  tls_fiber = nullptr;
  current_thread = nullptr;
}

// Fiber side: wait until the meeting completes.
void wait_in(Meeting& meeting, Fiber& self, const std::string& description) {
  self.state = State::kWaiting;
  self.waiting_at = description;
  meeting.waiters.push_back(&self);
  switch_to_scheduler(false);
}

void complete(Meeting& meeting) {
  for (Fiber* waiter : meeting.waiters) {
    waiter->state = State::kRunnable;
    waiter->waiting_at.clear();
  }
  meeting.waiters.clear();
}

[[noreturn]] void fail_here(const std::string& message) {
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  if (block.error.empty()) {
    const ThreadInfo& t = self.info;
    block.error = message + " (thread (" + std::to_string(t.thread_idx.x) + "," + std::to_string(t.thread_idx.y) + "," +
                  std::to_string(t.thread_idx.z) + "), warp " + std::to_string(t.warp) + " lane " +
                  std::to_string(t.lane) + ")";
  }
  self.state = State::kFailed;
  switch_to_scheduler(false);
  std::abort();  // a failed fiber is never resumed
}

std::string thread_list(const std::vector<unsigned>& ids) {
  std::ostringstream out;
  for (std::size_t i = 0; i < ids.size() && i < 8; ++i) out << (i ? "," : "") << ids[i];
  if (ids.size() > 8) out << ",... (" << ids.size() << " threads)";
  return out.str();
}

// Where every unfinished thread is, when none can run.
std::string deadlock_report(const Block& block) {
  std::map<std::string, std::vector<unsigned>> by_place;
  for (const Fiber& f : block.fibers) {
    if (f.state == State::kDone) by_place["exited"].push_back(f.info.linear);
    else by_place["waiting at " + f.waiting_at].push_back(f.info.linear);
  }
  std::ostringstream out;
  out << "deadlock: no thread can make progress (on a GPU this kernel hangs). Threads (linear ids):";
  for (const auto& [place, ids] : by_place) out << "\n  " << place << ": " << thread_list(ids);
  return out.str();
}

// The shared-memory section holds garbage at the start of each block, and is new memory
// for ThreadSanitizer (the previous block's accesses were to another SM's memory).
void reset_shared_memory() {
  if (!__start_dspark_shared || !__stop_dspark_shared) return;
  const std::size_t bytes = static_cast<std::size_t>(__stop_dspark_shared - __start_dspark_shared);
  std::memset(__start_dspark_shared, kSharedGarbage, bytes);
  if (AnnotateNewMemory) AnnotateNewMemory(__FILE__, __LINE__, __start_dspark_shared, bytes);
}

// Watchdog: ends the process when a launch runs past the time limit (a CUDA thread that
// never yields cannot be stopped any other way).
std::atomic<long long> watchdog_deadline_ns{0};
std::atomic<const char*> watchdog_kernel{nullptr};

void start_watchdog() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::thread([] {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        const long long deadline = watchdog_deadline_ns.load();
        const long long now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch()).count();
        if (deadline != 0 && now > deadline) {
          std::fprintf(stderr,
                       "dspark emulation watchdog: kernel %s ran longer than %d s (DSPARK_EMULATE_TIMEOUT_S): a thread "
                       "that never reaches a barrier or collective, or waits on another block; ending the process\n",
                       watchdog_kernel.load(), time_limit_seconds());
          std::fflush(stderr);
          std::_Exit(124);
        }
      }
    }).detach();
  });
}

void run_block(Block& block, const std::function<void()>& body) {
  reset_shared_memory();
  for (Fiber& f : block.fibers) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack->bottom();
    f.context.uc_stack.ss_size = f.stack->bytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    f.state = State::kRunnable;
    f.tsan_fiber = __tsan_create_fiber ? __tsan_create_fiber(0) : nullptr;
    f.tsan_ignores = 0;
  }
  tls_block = &block;
  tls_body = &body;
  for (;;) {
    bool ran = false;
    for (Fiber& f : block.fibers) {
      if (f.state != State::kRunnable) continue;
      resume(f);
      ran = true;
      if (!block.error.empty()) break;
    }
    if (!block.error.empty()) break;
    if (std::all_of(block.fibers.begin(), block.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; }))
      break;
    if (!ran) {
      block.error = deadlock_report(block);
      break;
    }
  }
  tls_block = nullptr;
  tls_body = nullptr;
  for (Fiber& f : block.fibers) {
    if (!f.tsan_fiber) continue;
    if (f.state != State::kDone) {
      // Abandoned: close its ignores and end it as that fiber, so that the launch's return
      // is ordered after its accesses as after those of the threads that finished.
      __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
      for (; f.tsan_ignores > 0; --f.tsan_ignores) __tsan_ignore_thread_end();
      if (__tsan_release) __tsan_release(&launch_end_token);
      __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
    }
    __tsan_destroy_fiber(f.tsan_fiber);
    f.tsan_fiber = nullptr;
  }
  if (!block.error.empty()) {
    // Fibers abandoned mid-frame leave stack poisoning behind: clear it before reuse.
    if (__asan_unpoison_memory_region)
      for (Fiber& f : block.fibers) __asan_unpoison_memory_region(f.stack->bottom(), f.stack->bytes);
    throw Error("dspark emulation: kernel " + std::string(block.kernel_name) + ", block " + block_string(block) +
                ": " + block.error);
  }
}

}  // namespace

void run_kernel(const char* kernel_name, dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  if (tls_fiber != nullptr) throw Error("dspark emulation: a kernel launch from inside a kernel is not supported");
  const unsigned long long threads = static_cast<unsigned long long>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.z > 64)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": invalid block size (" +
                std::to_string(block_dim.x) + "," + std::to_string(block_dim.y) + "," + std::to_string(block_dim.z) +
                "); CUDA allows at most 1024 threads");
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": invalid grid (" + std::to_string(grid.x) +
                "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  // One launch at a time (a launch on a stream is synchronous here anyway).
  static std::mutex launch_mutex;
  static std::vector<std::unique_ptr<Stack>> stacks;
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const TsanIgnore ignore;
  while (stacks.size() < threads) stacks.push_back(std::make_unique<Stack>(stack_bytes()));

  start_watchdog();
  watchdog_kernel.store(kernel_name);
  watchdog_deadline_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch()).count() +
                             static_cast<long long>(time_limit_seconds()) * 1000000000LL);
  struct DisarmWatchdog {
    ~DisarmWatchdog() { watchdog_deadline_ns.store(0); }
  } disarm;

  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block;
        block.kernel_name = kernel_name;
        block.index = uint3{x, y, z};
        block.num_threads = static_cast<unsigned>(threads);
        block.fibers.resize(threads);
        block.warp_meetings.resize((threads + 31) / 32);
        unsigned linear = 0;
        for (unsigned tz = 0; tz < block_dim.z; ++tz)
          for (unsigned ty = 0; ty < block_dim.y; ++ty)
            for (unsigned tx = 0; tx < block_dim.x; ++tx, ++linear) {
              Fiber& f = block.fibers[linear];
              f.info = ThreadInfo{uint3{tx, ty, tz}, block.index, block_dim, grid, linear, linear / 32, linear % 32};
              f.stack = stacks[linear].get();
            }
        // Each block on a new OS thread: its thread_local __shared__ variables (the
        // ThreadSanitizer build) are new memory, and nothing orders it after the previous
        // block except the launch itself.
        std::exception_ptr failure;
        std::thread worker([&] {
          tls_block = nullptr;  // first touch of this thread's TLS, outside the ignore below
          const TsanIgnore ignore_worker;
          tls_scheduler_tsan_fiber = __tsan_get_current_fiber ? __tsan_get_current_fiber() : nullptr;
          try {
            run_block(block, body);
          } catch (...) {
            failure = std::current_exception();
          }
        });
        worker.join();
        if (failure) {
          if (__tsan_acquire) __tsan_acquire(&launch_end_token);
          std::rethrow_exception(failure);
        }
      }
  if (__tsan_acquire) __tsan_acquire(&launch_end_token);
}

void syncthreads(Location where) {
  const TsanIgnore ignore;
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  if (!block.barrier) {
    block.barrier = std::make_shared<Meeting>();
    block.barrier->what = "__syncthreads";
    block.barrier->where = where;
  } else if (!same_location(block.barrier->where, where)) {
    fail_here("__syncthreads at " + where_string(where) + " while other threads of the block wait at __syncthreads at " +
              where_string(block.barrier->where) + " (divergent barrier)");
  }
  std::shared_ptr<Meeting> meeting = block.barrier;
  if (__tsan_release) __tsan_release(meeting.get());
  if (++meeting->arrived == static_cast<int>(block.num_threads)) {
    block.barrier.reset();
    complete(*meeting);
  } else {
    wait_in(*meeting, self, "__syncthreads at " + where_string(where));
  }
  if (__tsan_acquire) __tsan_acquire(meeting.get());
}

void warp_exchange(const char* what, unsigned mask, const void* mine, std::size_t bytes, void* all,
                   bool orders_memory, Location where) {
  const TsanIgnore ignore;
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  const unsigned warp = self.info.warp, lane = self.info.lane;
  if (bytes > kMaxExchangeBytes) fail_here(std::string(what) + ": value too large for the emulation");
  const unsigned first_thread = warp * 32;
  const unsigned lanes_in_warp = std::min(32u, block.num_threads - first_thread);
  const unsigned existing = lanes_in_warp == 32 ? 0xFFFFFFFFu : (1u << lanes_in_warp) - 1u;
  if ((mask & ~existing) != 0u)
    fail_here(std::string(what) + " at " + where_string(where) + ": mask " + hex(mask) +
              " names lanes that do not exist in this block's last warp (" + std::to_string(lanes_in_warp) +
              " lanes): they never arrive");
  auto& open = block.warp_meetings[warp];
  std::shared_ptr<Meeting> meeting;
  for (auto& m : open) {
    if ((m->mask & mask) == 0u) continue;
    if (m->mask != mask || std::strcmp(m->what, what) != 0 || !same_location(m->where, where) || m->bytes != bytes)
      fail_here(std::string(what) + "(mask " + hex(mask) + ") at " + where_string(where) + " while lanes " +
                hex(m->arrived_lanes) + " of the warp wait at " + m->what + "(mask " + hex(m->mask) + ") at " +
                where_string(m->where) + " (lanes must meet at the same collective with the same mask)");
    meeting = m;
  }
  if (!meeting) {
    meeting = std::make_shared<Meeting>();
    meeting->what = what;
    meeting->mask = mask;
    meeting->where = where;
    meeting->bytes = bytes;
    meeting->orders_memory = orders_memory;
    open.push_back(meeting);
  }
  if (meeting->arrived_lanes & (1u << lane)) fail_here(std::string(what) + ": lane arrived twice");
  if (bytes) std::memcpy(meeting->values[lane], mine, bytes);
  meeting->arrived_lanes |= 1u << lane;
  if (orders_memory && __tsan_release) __tsan_release(meeting.get());
  if (meeting->arrived_lanes == mask) {
    open.erase(std::find(open.begin(), open.end(), meeting));
    complete(*meeting);
  } else {
    wait_in(*meeting, self, std::string(what) + "(mask " + hex(mask) + ") at " + where_string(where));
  }
  if (bytes)
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) std::memcpy(static_cast<unsigned char*>(all) + l * bytes, meeting->values[l], bytes);
  if (orders_memory && __tsan_acquire) __tsan_acquire(meeting.get());
}

void fail(const std::string& message, Location where) {
  if (tls_fiber == nullptr) throw Error("dspark emulation: " + message + " at " + where_string(where));
  tsan_ignore_begin();
  fail_here(message + " at " + where_string(where));
}

}  // namespace dspark::emulate
