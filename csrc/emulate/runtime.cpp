// The CUDA emulation's runtime (include/dspark/emulate/runtime.h): blocks run one after
// another; the threads of a block are fibers scheduled round-robin, each running until it
// has to wait for others at a barrier or warp collective. On x86-64 a fiber switch is a
// few instructions (switch_stack below); elsewhere it is ucontext's swapcontext, which
// costs a system call per switch.
//
// Sanitizers: the fiber switches are announced to AddressSanitizer
// (__sanitizer_{start,finish}_switch_fiber) and ThreadSanitizer (__tsan_switch_to_fiber, no
// implied synchronisation); the runtime's own bookkeeping is hidden from ThreadSanitizer
// (__tsan_ignore_thread_begin/end), which sees only the synchronisation CUDA defines:
// barrier and __syncwarp (release on arrival, acquire on departure), the end of a launch,
// and the kernel's own atomics. The hooks are weak symbols, present when the process runs
// with a sanitizer runtime, so this file is built the same way for every build.
#include "dspark/emulate/runtime.h"

#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__x86_64__)
// switch_stack(&saved, next): pushes the callee-saved registers and the floating-point
// control words on the current stack, stores the stack pointer in *saved, continues on
// the stack `next` (saved the same way, or prepared by Context::start) and returns there.
extern "C" void dspark_emulate_switch_stack(void** saved, void* next);
asm(R"(
  .text
  .globl dspark_emulate_switch_stack
  .hidden dspark_emulate_switch_stack
  .type dspark_emulate_switch_stack, @function
dspark_emulate_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dspark_emulate_switch_stack, .-dspark_emulate_switch_stack
)");
#endif

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


namespace {

constexpr unsigned kTsanNoSync = 1u;           // __tsan_switch_to_fiber_no_sync
constexpr std::size_t kMaxExchangeBytes = 64;  // per lane and collective
constexpr unsigned char kSharedGarbage = 0xFF; // uninitialised shared memory: NaN, -1
constexpr unsigned kTsanWorkers = 2;           // block workers under ThreadSanitizer (StackPool)

std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("DSPARK_EMULATE_STACK_KB");
    const long kb = env ? std::atol(env) : 128;
    return static_cast<std::size_t>(std::max(64L, kb)) * 1024;
  }();
  return bytes;
}

// Under ThreadSanitizer, one TSan thread per warp (default) or per CUDA thread
// (DSPARK_EMULATE_TSAN_LANES=1). TSan's cost grows with the number of its threads (every
// barrier merges vector clocks of that size): per warp is about 20x faster, and still
// reports races between warps (a missing __syncthreads), but not between the lanes of
// one warp (a missing __syncwarp).
bool tsan_thread_per_lane() {
  static const bool per_lane = [] {
    const char* env = std::getenv("DSPARK_EMULATE_TSAN_LANES");
    return env != nullptr && std::atoi(env) != 0;
  }();
  return per_lane;
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

// A fiber stack: `bytes` above a PROT_NONE guard page (an overflow faults instead of
// corrupting the neighbour).
struct Stack {
  char* bottom;
  std::size_t bytes;
  bool abandoned = false;       // its last fiber stopped mid-frame (a failed launch)
  void* tsan_fiber = nullptr;   // the ThreadSanitizer thread of every fiber on this stack
};

// Fiber stacks, in one mapping made once: memory mapped later could be the old stack of a
// finished thread, whose accesses ThreadSanitizer still remembers. One set of stacks per
// block worker (one per CUDA thread of a block).
//
// Under ThreadSanitizer every fiber on a stack is the same TSan thread (created once), and
// the threads of a block happen after those of the worker's previous block (which used the
// same stacks and shared memory): their frames and shared memory do not "race". Blocks on
// different workers stay unordered, so with kTsanWorkers = 2 a conflict between neighbouring
// blocks is reported (the usual bug: thread 0 of every block writing the same address).
class StackPool {
 public:
  static constexpr unsigned kThreadsPerSet = 1024;

  StackPool(std::size_t stack_bytes, unsigned sets) : stack_bytes_(stack_bytes), sets_(sets) {
    const std::size_t slots = std::size_t{kThreadsPerSet} * sets_;
    void* p = mmap(nullptr, slot_bytes() * slots, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("dspark emulation: cannot map the fiber stacks");
    char* base = static_cast<char*>(p);
    for (std::size_t i = 0; i < slots; ++i) {
      mprotect(base + i * slot_bytes(), page(), PROT_NONE);
      stacks_.push_back(Stack{base + i * slot_bytes() + page(), stack_bytes_});
    }
  }

  Stack* stack(unsigned set, unsigned thread) { return &stacks_[set * kThreadsPerSet + thread]; }

  // Ends the TSan threads of the fibers (at the end of a launch, which orders everything
  // after it): TSan's cost grows with the history a thread keeps.
  void end_tsan_threads() {
    for (Stack& stack : stacks_)
      if (stack.tsan_fiber) {
        __tsan_destroy_fiber(stack.tsan_fiber);
        stack.tsan_fiber = nullptr;
      }
  }

 private:
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  std::size_t slot_bytes() const { return page() + stack_bytes_; }

  std::size_t stack_bytes_;
  unsigned sets_;
  std::vector<Stack> stacks_;
};

enum class State { kRunnable, kWaiting, kDone, kFailed };

struct Meeting;

// A saved execution context: where a fiber (or the scheduler) continues.
struct Context {
#if defined(__x86_64__)
  void* stack_pointer = nullptr;

  // Prepares the stack so that the first switch here "returns" into entry().
  void start(char* bottom, std::size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(bottom + bytes) & ~uintptr_t{15});
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    // The switch pops 8 words and returns into entry with the stack pointer at top - 1
    // (16n + 8 bytes, as right after a call), where entry finds its return address: 0.
    uint64_t* sp = top - 9;
    sp[0] = static_cast<uint64_t>(control[0]) | (static_cast<uint64_t>(control[1] & 0xFFFFu) << 32);
    for (int reg = 1; reg <= 6; ++reg) sp[reg] = 0;  // r15 r14 r13 r12 rbx rbp
    sp[7] = reinterpret_cast<uint64_t>(entry);
    sp[8] = 0;
    stack_pointer = sp;
  }
  static void switch_to(Context& from, Context& to) { dspark_emulate_switch_stack(&from.stack_pointer, to.stack_pointer); }
#else
  ucontext_t context;

  void start(char* bottom, std::size_t bytes, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = bottom;
    context.uc_stack.ss_size = bytes;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
  static void switch_to(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif
};

struct Fiber {
  ThreadInfo info;
  Context context;
  Stack* stack = nullptr;
  State state = State::kRunnable;
  const Meeting* waiting_in = nullptr;  // for deadlock reports
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
  unsigned arrived_lanes = 0;
  int arrived = 0;
  int leaving = 0;  // participants that have not left yet; the last one recycles it
  unsigned pool = 0;
  std::vector<Fiber*> waiters;           // capacity for a whole block: never reallocated
  unsigned char values[32 * kMaxExchangeBytes];  // lane l's contribution at l * bytes
};

struct Block {
  const char* kernel_name;
  uint3 index;
  std::vector<Fiber> fibers;
  unsigned num_threads = 0;
  Meeting* barrier = nullptr;
  std::vector<std::vector<Meeting*>> warp_meetings;  // per warp, open meetings
  std::string error;

  // Meetings are recycled, not allocated per barrier: an allocation under ThreadSanitizer
  // records a stack trace, which was most of the emulation's time. A recycled meeting
  // keeps its synchronisation history, so each warp (and the barrier: pool `warps`) has its
  // own pool: one warp's __syncwarp never orders another warp.
  std::vector<std::unique_ptr<Meeting>> meetings;
  std::vector<std::vector<Meeting*>> free_meetings;  // per pool

  Meeting* new_meeting(unsigned pool, const char* what, unsigned mask, Location where, std::size_t bytes,
                       int participants);

  void leave(Meeting* m);
};

// Scheduler state of the OS thread that runs a launch.
thread_local const ThreadInfo* current_thread = nullptr;  // null outside a kernel
thread_local Block* tls_block = nullptr;
thread_local Fiber* tls_fiber = nullptr;  // the fiber running now
thread_local Context tls_scheduler_context;
thread_local void* tls_scheduler_tsan_fiber = nullptr;
thread_local const void* tls_scheduler_stack_bottom = nullptr;
thread_local std::size_t tls_scheduler_stack_size = 0;
thread_local const std::function<void()>* tls_body = nullptr;
// ThreadSanitizer: a block's scheduler (which started after the launch) happens before the
// block's threads, their ends before the launch's return and before the threads of the
// next block on the same worker (which reuses its shared memory).
char block_start_token;
char launch_end_token;
thread_local char tls_worker_token;

// The runtime is compiled without ThreadSanitizer's instrumentation (CMakeLists.txt), so
// its own loads and stores are invisible to it; what it does through intercepted libc
// calls (allocation, memcpy, strings) is hidden with these ignores, kept off the hot paths
// (an ignore records a stack trace). Ignores are counted per fiber: the lanes of a warp
// may share a TSan thread, and a fiber switches out with its ignores and back in with them.
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

// A copy that is not a call of the intercepted memcpy (the byte loop is not turned into one).
void copy_bytes(void* to, const void* from, std::size_t bytes) {
  auto* out = static_cast<volatile unsigned char*>(to);
  const auto* in = static_cast<const unsigned char*>(from);
  for (std::size_t i = 0; i < bytes; ++i) out[i] = in[i];
}

Meeting* Block::new_meeting(unsigned pool, const char* what, unsigned mask, Location where, std::size_t bytes,
                     int participants) {
  std::vector<Meeting*>& free = free_meetings[pool];  // sized by the launcher
  if (free.empty()) {
    const TsanIgnore ignore;
    meetings.push_back(std::make_unique<Meeting>());
    meetings.back()->waiters.reserve(1024);
    free.push_back(meetings.back().get());
  }
  Meeting* m = free.back();
  free.pop_back();
  m->pool = pool;
  m->what = what;
  m->mask = mask;
  m->where = where;
  m->bytes = bytes;
  m->arrived_lanes = 0;
  m->arrived = 0;
  m->leaving = participants;
  return m;
}

void Block::leave(Meeting* m) {
  if (--m->leaving != 0) return;
  std::vector<Meeting*>& free = free_meetings[m->pool];
  if (free.size() == free.capacity()) {
    const TsanIgnore ignore;
    free.reserve(2 * free.capacity() + 8);
  }
  free.push_back(m);
}

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
  if (__tsan_switch_to_fiber) {
    // The lanes of a warp may share a TSan thread: this lane's ignores leave with it.
    for (int i = 0; i < self->tsan_ignores; ++i) __tsan_ignore_thread_end();
    __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
  }
  Context::switch_to(self->context, tls_scheduler_context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(self->asan_fake_stack, nullptr, nullptr);
}

void fiber_entry() {
  if (__tsan_acquire) {
    __tsan_acquire(&block_start_token);
    __tsan_acquire(&tls_worker_token);
  }
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(nullptr, &tls_scheduler_stack_bottom, &tls_scheduler_stack_size);
  Fiber* self = tls_fiber;
  try {
    (*tls_body)();
  } catch (const std::exception& e) {
    if (tls_block->error.empty()) tls_block->error = std::string("a thread threw: ") + e.what();
  }
  if (__tsan_release) {
    __tsan_release(&launch_end_token);
    __tsan_release(&tls_worker_token);
  }
  self->state = State::kDone;
  self->stack->abandoned = false;
  switch_to_scheduler(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

// Scheduler side: run fiber f until it waits, finishes or fails.
void resume(Fiber& f) {
  tls_fiber = &f;
  current_thread = &f.info;
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&fake_stack, f.stack->bottom, f.stack->bytes);
  if (__tsan_switch_to_fiber) {
    __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
    for (int i = 0; i < f.tsan_ignores; ++i) __tsan_ignore_thread_begin();  // and come back with it
  }
  Context::switch_to(tls_scheduler_context, f.context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
  tls_fiber = nullptr;
  current_thread = nullptr;
}

// Fiber side: wait until the meeting completes.
void wait_in(Meeting& meeting, Fiber& self) {
  self.state = State::kWaiting;
  self.waiting_in = &meeting;
  meeting.waiters.push_back(&self);
  switch_to_scheduler(false);
}

void complete(Meeting& meeting) {
  for (Fiber* waiter : meeting.waiters) {
    waiter->state = State::kRunnable;
    waiter->waiting_in = nullptr;
  }
  meeting.waiters.clear();
}

std::string describe(const Meeting& meeting) {
  if (std::strcmp(meeting.what, "__syncthreads") == 0) return "__syncthreads at " + where_string(meeting.where);
  return std::string(meeting.what) + "(mask " + hex(meeting.mask) + ") at " + where_string(meeting.where);
}

// Error paths build strings (intercepted allocations): DSPARK_FAIL_HERE hides them.
#define DSPARK_FAIL_HERE(message) (tsan_ignore_begin(), fail_here(message))

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
    else if (f.waiting_in) by_place["waiting at " + describe(*f.waiting_in)].push_back(f.info.linear);
    else by_place["stopped"].push_back(f.info.linear);
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

// A persistent OS thread that runs the blocks handed to it, one at a time, with a small
// stack of its own (it runs only the block's scheduler; the fibers have their own stacks).
// Block b runs on worker b % kWorkers with the stack set of that worker: its thread_local
// __shared__ variables (ThreadSanitizer build) and its fibers' stacks are then never
// memory that another worker's fibers touched.
class BlockWorker {
 public:
  BlockWorker() {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, std::size_t{1} << 20);
    void* (*start)(void*) = [](void* self) -> void* {
      static_cast<BlockWorker*>(self)->loop();
      return nullptr;
    };
    const int rc = pthread_create(&thread_, &attr, start, this);
    pthread_attr_destroy(&attr);
    if (rc != 0) throw Error("dspark emulation: cannot start a block worker thread");
    pthread_detach(thread_);
  }

  // Runs job on the worker and waits for it (the mutex orders the two, as a launch does).
  void run(const std::function<void()>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    changed_.notify_all();
    changed_.wait(lock, [this] { return job_ == nullptr; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [this] { return job_ != nullptr; });
      (*job_)();
      job_ = nullptr;
      changed_.notify_all();
    }
  }

  pthread_t thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  const std::function<void()>* job_ = nullptr;
};

void run_block(Block& block, const std::function<void()>& body) {
  reset_shared_memory();
  if (__tsan_release) __tsan_release(&block_start_token);
  for (Fiber& f : block.fibers) {
    // A finished fiber never returns from its first frames, whose AddressSanitizer
    // poisoning stays behind near the top of its stack; an abandoned one leaves it anywhere.
    if (__asan_unpoison_memory_region) {
      const std::size_t dirty = f.stack->abandoned ? f.stack->bytes : std::min<std::size_t>(f.stack->bytes, 16384);
      __asan_unpoison_memory_region(f.stack->bottom + f.stack->bytes - dirty, dirty);
    }
    f.stack->abandoned = true;  // until the fiber finishes
    f.context.start(f.stack->bottom, f.stack->bytes, fiber_entry);
    f.state = State::kRunnable;
    if (__tsan_create_fiber) {
      Stack* owner = tsan_thread_per_lane() ? f.stack : f.stack - f.info.lane;  // the warp's lane 0
      if (!owner->tsan_fiber) owner->tsan_fiber = __tsan_create_fiber(0);
      f.tsan_fiber = owner->tsan_fiber;
    }
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
      // Abandoned (its ignores ended when it switched out): end it as that fiber, so that
      // the launch's return is ordered after its accesses as after those of the others.
      __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
      if (__tsan_release) {
        __tsan_release(&launch_end_token);
        __tsan_release(&tls_worker_token);
      }
      __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
    }
    f.tsan_fiber = nullptr;
  }
  if (!block.error.empty()) {
    throw Error("dspark emulation: kernel " + std::string(block.kernel_name) + ", block " + block_string(block) +
                ": " + block.error);
  }
}

}  // namespace

ThreadInfo this_thread() {
  if (current_thread == nullptr) throw Error("dspark emulation: threadIdx/blockIdx read outside a kernel");
  return *current_thread;
}

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
  const std::lock_guard<std::mutex> lock(launch_mutex);
  // Under ThreadSanitizer four workers (see StackPool), otherwise one.
  static const unsigned num_workers = __tsan_switch_to_fiber ? kTsanWorkers : 1;
  static StackPool stacks(stack_bytes(), num_workers);
  // Never destroyed: at exit a worker still waits on its condition variable.
  static auto& workers = *new std::vector<std::unique_ptr<BlockWorker>>();
  const TsanIgnore ignore;
  while (workers.size() < num_workers) workers.push_back(std::make_unique<BlockWorker>());

  start_watchdog();
  watchdog_kernel.store(kernel_name);
  watchdog_deadline_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch()).count() +
                             static_cast<long long>(time_limit_seconds()) * 1000000000LL);
  struct DisarmWatchdog {
    ~DisarmWatchdog() { watchdog_deadline_ns.store(0); }
  } disarm;

  unsigned long long block_number = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++block_number) {
        Block block;
        block.kernel_name = kernel_name;
        block.index = uint3{x, y, z};
        block.num_threads = static_cast<unsigned>(threads);
        block.fibers.resize(threads);
        block.warp_meetings.resize((threads + 31) / 32);
        for (auto& open : block.warp_meetings) open.reserve(32);
        block.free_meetings.resize(block.warp_meetings.size() + 1);  // a pool per warp, and the barrier's
        for (auto& free : block.free_meetings) free.reserve(16);
        unsigned linear = 0;
        for (unsigned tz = 0; tz < block_dim.z; ++tz)
          for (unsigned ty = 0; ty < block_dim.y; ++ty)
            for (unsigned tx = 0; tx < block_dim.x; ++tx, ++linear) {
              Fiber& f = block.fibers[linear];
              f.info = ThreadInfo{uint3{tx, ty, tz}, block.index, block_dim, grid, linear, linear / 32, linear % 32};
              f.stack = stacks.stack(static_cast<unsigned>(block_number % num_workers), linear);
            }
        std::exception_ptr failure;
        workers[block_number % num_workers]->run([&] {
          const TsanIgnore ignore_worker;
          tls_scheduler_tsan_fiber = __tsan_get_current_fiber ? __tsan_get_current_fiber() : nullptr;
          try {
            run_block(block, body);
          } catch (...) {
            failure = std::current_exception();
          }
        });
        if (failure) {
          if (__tsan_acquire) __tsan_acquire(&launch_end_token);
          stacks.end_tsan_threads();
          std::rethrow_exception(failure);
        }
      }
  if (__tsan_acquire) __tsan_acquire(&launch_end_token);
  stacks.end_tsan_threads();
}

void syncthreads(Location where) {
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  if (!block.barrier) {
    block.barrier = block.new_meeting(static_cast<unsigned>(block.warp_meetings.size()), "__syncthreads", 0, where, 0,
                                      static_cast<int>(block.num_threads));
  } else if (!same_location(block.barrier->where, where)) {
    DSPARK_FAIL_HERE("__syncthreads at " + where_string(where) + " while other threads of the block wait at __syncthreads at " +
              where_string(block.barrier->where) + " (divergent barrier)");
  }
  Meeting* meeting = block.barrier;
  if (__tsan_release) __tsan_release(meeting);
  if (++meeting->arrived == static_cast<int>(block.num_threads)) {
    block.barrier = nullptr;
    complete(*meeting);
  } else {
    wait_in(*meeting, self);
  }
  if (__tsan_acquire) __tsan_acquire(meeting);
  block.leave(meeting);
}

void warp_exchange(const char* what, unsigned mask, const void* mine, std::size_t bytes, void* all,
                   bool orders_memory, Location where) {
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  const unsigned warp = self.info.warp, lane = self.info.lane;
  if (bytes > kMaxExchangeBytes) DSPARK_FAIL_HERE(std::string(what) + ": value too large for the emulation");
  const unsigned first_thread = warp * 32;
  const unsigned lanes_in_warp = std::min(32u, block.num_threads - first_thread);
  const unsigned existing = lanes_in_warp == 32 ? 0xFFFFFFFFu : (1u << lanes_in_warp) - 1u;
  if ((mask & ~existing) != 0u)
    DSPARK_FAIL_HERE(std::string(what) + " at " + where_string(where) + ": mask " + hex(mask) +
              " names lanes that do not exist in this block's last warp (" + std::to_string(lanes_in_warp) +
              " lanes): they never arrive");
  auto& open = block.warp_meetings[warp];
  Meeting* meeting = nullptr;
  for (Meeting* m : open) {
    if ((m->mask & mask) == 0u) continue;
    if (m->mask != mask || std::strcmp(m->what, what) != 0 || !same_location(m->where, where) || m->bytes != bytes)
      DSPARK_FAIL_HERE(std::string(what) + "(mask " + hex(mask) + ") at " + where_string(where) + " while lanes " +
                hex(m->arrived_lanes) + " of the warp wait at " + m->what + "(mask " + hex(m->mask) + ") at " +
                where_string(m->where) + " (lanes must meet at the same collective with the same mask)");
    meeting = m;
  }
  if (!meeting) {
    meeting = block.new_meeting(warp, what, mask, where, bytes, __builtin_popcount(mask));
    open.push_back(meeting);
  }
  if (meeting->arrived_lanes & (1u << lane)) DSPARK_FAIL_HERE(std::string(what) + ": lane arrived twice");
  copy_bytes(meeting->values + lane * bytes, mine, bytes);
  meeting->arrived_lanes |= 1u << lane;
  if (orders_memory && __tsan_release) __tsan_release(meeting);
  if (meeting->arrived_lanes == mask) {
    *std::find(open.begin(), open.end(), meeting) = open.back();  // no memmove (an intercepted call)
    open.pop_back();
    complete(*meeting);
  } else {
    wait_in(*meeting, self);
  }
  if (bytes)
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) copy_bytes(static_cast<unsigned char*>(all) + l * bytes, meeting->values + l * bytes, bytes);
  if (orders_memory && __tsan_acquire) __tsan_acquire(meeting);
  block.leave(meeting);
}

void fail(const std::string& message, Location where) {
  // (the message was built by the caller, which is the kernel's business)
  if (tls_fiber == nullptr) throw Error("dspark emulation: " + message + " at " + where_string(where));
  tsan_ignore_begin();
  fail_here(message + " at " + where_string(where));
}

}  // namespace dspark::emulate
