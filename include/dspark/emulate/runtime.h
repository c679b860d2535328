// The runtime of the CUDA emulation: runs a kernel's blocks on the CPU, one fiber per CUDA
// thread, and implements the points where CUDA threads meet (block barrier, warp
// collectives). Implemented in csrc/emulate/runtime.cpp; device.h turns CUDA syntax into
// calls of these functions.
//
// Model:
//  * Blocks run one after another, on block-worker OS threads. Inside a block every CUDA thread
//    is a fiber (its own stack); a fiber runs until it reaches a barrier or a warp collective
//    that not all its participants have reached, then the next runnable fiber runs. So a
//    barrier or shuffle has its real meaning: nobody passes it until everybody it waits for
//    has arrived with their values.
//  * A barrier or collective that can never complete (a thread exited, or waits somewhere
//    else) is a deadlock on a GPU. Here it is reported at once, as an Error naming the kernel,
//    the block, and where each thread waits; so is a kernel that runs past a time limit.
//  * Under ThreadSanitizer each fiber is a TSan fiber. Only __syncthreads and __syncwarp
//    order memory between threads (as in CUDA's memory model); shuffles and votes exchange
//    values but order nothing, and blocks of a launch are unordered with respect to each
//    other. A missing barrier between a shared-memory write and a read of another thread is
//    then a data race that TSan reports.
#pragma once

#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace dspark::emulate {

// Source position of a barrier or collective: threads of a block must meet at the same one.
struct Location {
  const char* file;
  int line;
};

#define DSPARK_EMULATE_HERE (::dspark::emulate::Location{__FILE__, __LINE__})

// What threadIdx, blockIdx, blockDim and gridDim read for the running CUDA thread.
struct ThreadInfo {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  unsigned warp;    // linear / 32
  unsigned lane;    // linear % 32
};

// The CUDA thread running now, as a copy: kernel code never touches the runtime's memory
// (for ThreadSanitizer it is the runtime's business). A function, not a thread_local
// variable read inline: an optimising compiler may keep a thread_local's value across the
// fiber switches inside a barrier call, which it takes for an ordinary function call.
ThreadInfo this_thread();

// A kernel that could not run to the end: deadlock, divergent barrier, bad collective,
// time limit. The message names the kernel and the block.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs body once per CUDA thread of every block of grid x block. Throws Error.
void run_kernel(const char* kernel_name, dim3 grid, dim3 block, const std::function<void()>& body);

// __syncthreads(): waits until every thread of the block has reached this barrier.
void syncthreads(Location where);

// The one warp collective everything else is built on: the lanes named in mask (the
// caller among them) meet at `where`, each contributing `bytes` bytes; when all have
// arrived, each gets all contributions, lane l's at all + l * bytes (lanes outside the
// mask left untouched). `what` names the operation in error messages; lanes must agree on
// it, on the mask and on the location. With orders_memory (__syncwarp) the meeting also
// orders the lanes' memory accesses, as a barrier does.
void warp_exchange(const char* what, unsigned mask, const void* mine, std::size_t bytes, void* all,
                   bool orders_memory, Location where);

// Reports a misuse found by device.h (for example a lane outside its own mask) as an Error
// of the running kernel.
[[noreturn]] void fail(const std::string& message, Location where);

}  // namespace dspark::emulate
