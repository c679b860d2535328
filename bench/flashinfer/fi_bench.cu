// Times FlashInfer's speculative-sampling pipeline on the shapes of bench/bench_verify.py's
// quick CUDA grid, for comparison with torch.ops.dspark.verify. A standalone program (CUDA
// runtime only, no torch): it includes FlashInfer's headers, unmodified, from the folder
// bench/flashinfer/prepare.sh fills (.flashinfer/include), and calls their host launchers.
// Build with bench/flashinfer/build.sh; bench/gpu_check.sh builds and runs it when
// .flashinfer/ is present.
//
// Inputs, as bench_verify.py makes them: padded target logits [B, K+1, V] = 3 * N(0, 1) and
// draft logits [B, K, V] = target rows 0..K-1 + N(0, 1), stored in bf16; draft tokens drawn
// from the stored draft logits at the mode's temperature (greedy: their argmax).
//
// The pipeline an engine runs with FlashInfer (its Python API's defaults) for each mode:
//   plain, topk_topp (T = 1):
//     [harness]    bf16 -> fp32 of the target and draft logits (FlashInfer's softmax binding
//                  takes fp32 logits; an engine casts, as logits.float() would)
//     [api]        zero the accepted / emitted counters (flashinfer.chain_speculative_sampling
//                  allocates them with torch.zeros)
//     [flashinfer] sampling::OnlineSoftmax<float> over the B*(K+1) target rows and over the
//                  B*K draft rows (per-row temperature array, PDL on sm_90+ as the API does)
//     topk_topp only, on the target probabilities (top-k first, then top-p, as verify):
//     [flashinfer] sampling::RadixTopKRenormProbMultiCTA<float, int> (top_k = 50)
//     [flashinfer] sampling::air_top_p::AirTopPRenormProb<false, float> (top_p = 0.9;
//                  sampling::TopPRenormProb<float> when V < 2048, as renorm.cu chooses)
//     [flashinfer] sampling::ChainSpeculativeSampling<float, int> (deterministic = true,
//                  per-request Philox seed and offset arrays)
//   greedy (T = 0; FlashInfer has no greedy chain verify, an engine takes the target argmax):
//     [flashinfer] sampling::TopKDispatch<__nv_bfloat16, int> with k = 1 on the bf16 target
//                  rows (the native radix/filtered top-k dispatcher of flashinfer.top_k)
//     [harness]    accept the longest prefix of drafts equal to the argmax, then the argmax
//
// Timing as bench/common.py's ColdTimer: before every timed run the L2 is flushed (a memset
// of max(256 MiB, 2 x L2)) outside the timed region; CUDA events around the pipeline only;
// the median of --reps runs after --warmup runs. Three sets per shape: the whole pipeline
// from bf16 logits ("us", the figure to compare with verify's op_us), the same without the
// casts ("us_from_fp32"), and a per-stage breakdown (an event after each stage).
//
// Usage: fi_bench [--out FILE.json] [--reps 20] [--warmup 3] [--batches 1,8,64,256] [--k 7]
//                 [--vocab 151936] [--modes plain,topk_topp,greedy] [--top-k 50] [--top-p 0.9]
//                 [--seed 1234] [--logit-scale 3] [--noise 1] [--flashinfer-version X]
// Prints a markdown table on stdout, progress on stderr; exit status 0 when every shape ran.

#include <flashinfer/air_top_p.cuh>
#include <flashinfer/sampling.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <curand_kernel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = flashinfer::sampling;

namespace {

// ------------------------------------------------------------------------- errors
struct BenchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(cudaError_t status, const char* what, int line) {
  if (status != cudaSuccess) {
    throw BenchError(std::string(what) + " (line " + std::to_string(line) +
                     "): " + cudaGetErrorString(status));
  }
}
#define CHECK(call) check((call), #call, __LINE__)

// ------------------------------------------------------------------------- harness kernels
// Not FlashInfer's: input generation, the bf16 -> fp32 cast and the greedy prefix match.

__global__ void fill_logits_kernel(__nv_bfloat16* target, __nv_bfloat16* draft, uint32_t batch,
                                   uint32_t num_draft, uint32_t vocab, float logit_scale,
                                   float noise, unsigned long long seed) {
  const size_t tid = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  const size_t total = size_t(batch) * (num_draft + 1) * vocab;
  curandStatePhilox4_32_10_t state;
  curand_init(seed, tid, 0, &state);
  for (size_t i = tid; i < total; i += stride) {
    const size_t row = i / vocab;
    const uint32_t col = uint32_t(i - row * vocab);
    const uint32_t b = uint32_t(row / (num_draft + 1));
    const uint32_t j = uint32_t(row - size_t(b) * (num_draft + 1));
    const float2 z = curand_normal2(&state);
    const float x = logit_scale * z.x;
    target[i] = __float2bfloat16(x);
    if (j < num_draft) {
      draft[(size_t(b) * num_draft + j) * vocab + col] = __float2bfloat16(x + noise * z.y);
    }
  }
}

struct Candidate {
  float key;
  int index;
};

struct CandidateMax {
  __device__ Candidate operator()(const Candidate& a, const Candidate& b) const {
    return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
  }
};

// One block per draft row: Gumbel-max over logits / T (T = 0: the argmax).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    draft_token_kernel(const __nv_bfloat16* draft, uint32_t vocab, float temperature,
                       unsigned long long seed, int* tokens) {
  using Reduce = cub::BlockReduce<Candidate, BLOCK>;
  __shared__ typename Reduce::TempStorage storage;
  const uint32_t row = blockIdx.x;
  curandStatePhilox4_32_10_t state;
  curand_init(seed, (unsigned long long)row * BLOCK + threadIdx.x, 0, &state);
  Candidate best{-INFINITY, INT32_MAX};
  for (uint32_t v = threadIdx.x; v < vocab; v += BLOCK) {
    float key = __bfloat162float(draft[size_t(row) * vocab + v]);
    if (temperature > 0.f) {
      const float u = fminf(curand_uniform(&state), 0.99999994f);  // (0, 1)
      key = key / temperature - logf(-logf(u));
    }
    best = CandidateMax()(best, Candidate{key, int(v)});
  }
  best = Reduce(storage).Reduce(best, CandidateMax());
  if (threadIdx.x == 0) tokens[row] = best.index;
}

__global__ void cast_bf16_to_f32_kernel(const __nv_bfloat16* __restrict__ in,
                                        float* __restrict__ out, size_t n) {
  const size_t tid = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  const size_t n8 = n / 8;
  for (size_t i = tid; i < n8; i += stride) {
    const uint4 raw = reinterpret_cast<const uint4*>(in)[i];
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float2 f[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) f[k] = __bfloat1622float2(pairs[k]);
    reinterpret_cast<float4*>(out)[2 * i] = make_float4(f[0].x, f[0].y, f[1].x, f[1].y);
    reinterpret_cast<float4*>(out)[2 * i + 1] = make_float4(f[2].x, f[2].y, f[3].x, f[3].y);
  }
  for (size_t i = n8 * 8 + tid; i < n; i += stride) out[i] = __bfloat162float(in[i]);
}

// One thread per request: drafts accepted while they equal the target argmax, then the
// argmax of the first mismatching (or the bonus) row; -1 after it.
__global__ void greedy_accept_kernel(const int* target_top1, const int* draft_ids,
                                     uint32_t batch, uint32_t num_draft, int* out_tokens,
                                     int* num_accepted) {
  const uint32_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int* top1 = target_top1 + size_t(b) * (num_draft + 1);
  const int* drafts = draft_ids + size_t(b) * num_draft;
  int* out = out_tokens + size_t(b) * (num_draft + 1);
  uint32_t n = 0;
  while (n < num_draft && drafts[n] == top1[n]) {
    out[n] = drafts[n];
    ++n;
  }
  out[n] = top1[n];
  for (uint32_t j = n + 1; j <= num_draft; ++j) out[j] = -1;
  num_accepted[b] = int(n);
}

// ------------------------------------------------------------------------- device memory
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n) CHECK(cudaMalloc(&ptr, n));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
  DeviceBuffer buf(host.size() * sizeof(T));
  CHECK(cudaMemcpy(buf.ptr, host.data(), buf.bytes, cudaMemcpyHostToDevice));
  return buf;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// ------------------------------------------------------------------------- options
struct Options {
  std::string out;
  int reps = 20;
  int warmup = 3;
  std::vector<uint32_t> batches{1, 8, 64, 256};
  std::vector<std::string> modes{"plain", "topk_topp", "greedy"};
  uint32_t num_draft = 7;
  uint32_t vocab = 151936;
  int top_k = 50;
  float top_p = 0.9f;
  unsigned long long seed = 1234;
  float logit_scale = 3.f;
  float noise = 1.f;
  std::string flashinfer_version = "unknown";
};

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const size_t stop = comma == std::string::npos ? text.size() : comma;
    if (stop > start) parts.push_back(text.substr(start, stop - start));
    start = stop + 1;
  }
  return parts;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw BenchError("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--out") o.out = value();
    else if (arg == "--reps") o.reps = std::max(1, std::stoi(value()));
    else if (arg == "--warmup") o.warmup = std::max(0, std::stoi(value()));
    else if (arg == "--k") o.num_draft = uint32_t(std::stoul(value()));
    else if (arg == "--vocab") o.vocab = uint32_t(std::stoul(value()));
    else if (arg == "--top-k") o.top_k = std::stoi(value());
    else if (arg == "--top-p") o.top_p = std::stof(value());
    else if (arg == "--seed") o.seed = std::stoull(value());
    else if (arg == "--logit-scale") o.logit_scale = std::stof(value());
    else if (arg == "--noise") o.noise = std::stof(value());
    else if (arg == "--flashinfer-version") o.flashinfer_version = value();
    else if (arg == "--batches") {
      o.batches.clear();
      for (const auto& s : split(value())) o.batches.push_back(uint32_t(std::stoul(s)));
    } else if (arg == "--modes") {
      o.modes = split(value());
      for (const auto& m : o.modes) {
        if (m != "plain" && m != "topk_topp" && m != "greedy") throw BenchError("unknown mode " + m);
      }
    } else if (arg == "-h" || arg == "--help") {
      std::printf("see the header of bench/flashinfer/fi_bench.cu\n");
      std::exit(0);
    } else {
      throw BenchError("unknown argument " + arg);
    }
  }
  if (o.num_draft < 1 || o.vocab < 2) throw BenchError("--k must be >= 1 and --vocab >= 2");
  return o;
}

// ------------------------------------------------------------------------- one shape
struct Stage {
  std::string name;
  std::string source;  // "flashinfer", "harness" or "api"
  std::string call;
  bool cast = false;   // left out of the from-fp32 pipeline
  std::function<void()> run;
  double median_us = 0;
};

struct Result {
  std::string mode;
  uint32_t batch = 0, num_draft = 0, vocab = 0;
  float temperature = 1.f;
  int top_k = -1;
  float top_p = -1.f;
  std::string skipped;
  double us = 0, us_min = 0, us_max = 0, us_from_fp32 = -1;
  int reps = 0;
  double mean_accepted = 0;
  long invalid_tokens = 0;
  std::vector<Stage> stages;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class Bench {
 public:
  explicit Bench(const Options& o) : opt_(o) {
    CHECK(cudaGetDevice(&device_));
    CHECK(cudaGetDeviceProperties(&props_, device_));
    CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    flush_bytes_ = std::max<size_t>(size_t(256) << 20, 2 * size_t(props_.l2CacheSize));
    flush_ = DeviceBuffer(flush_bytes_);
    softmax_ws_ = DeviceBuffer(size_t(1) << 20);            // flashinfer.softmax's 1 MiB cache buffer
    topk_renorm_states_ = DeviceBuffer(size_t(1) << 20);    // _get_row_states_buffer: 1 MiB, zeroed once
    top1_states_ = DeviceBuffer(size_t(1) << 20);
    CHECK(cudaMemset(topk_renorm_states_.ptr, 0, topk_renorm_states_.bytes));
    CHECK(cudaMemset(top1_states_.ptr, 0, top1_states_.bytes));
    CHECK(cudaDeviceSynchronize());  // the legacy stream does not order the non-blocking one
    for (auto& e : events_) CHECK(cudaEventCreate(&e));
  }
  ~Bench() {
    for (auto& e : events_) cudaEventDestroy(e);
    cudaStreamDestroy(stream_);
  }

  const cudaDeviceProp& props() const { return props_; }
  size_t flush_bytes() const { return flush_bytes_; }

  Result run(const std::string& mode, uint32_t batch) {
    Result r;
    r.mode = mode;
    r.batch = batch;
    r.num_draft = opt_.num_draft;
    r.vocab = opt_.vocab;
    const bool greedy = mode == "greedy";
    const bool filtered = mode == "topk_topp";
    r.temperature = greedy ? 0.f : 1.f;
    if (filtered) {
      r.top_k = opt_.top_k;
      r.top_p = opt_.top_p;
    }
    const uint32_t K = opt_.num_draft, V = opt_.vocab;
    const size_t rows_t = size_t(batch) * (K + 1), rows_d = size_t(batch) * K;
    const size_t nt = rows_t * V, nd = rows_d * V;

    // Memory: bf16 inputs, plus fp32 logits and probabilities (and two renormalised copies).
    size_t need = 2 * (nt + nd);
    if (!greedy) need += 4 * 2 * (nt + nd) + (filtered ? 4 * 2 * nt : 0);
    size_t free_bytes = 0, total_bytes = 0;
    CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (double(need) > 0.9 * double(free_bytes)) {
      r.skipped = "needs ~" + std::to_string(need >> 20) + " MiB, " +
                  std::to_string(free_bytes >> 20) + " MiB free";
      return r;
    }

    // Inputs.
    DeviceBuffer target_bf16(nt * 2), draft_bf16(nd * 2);
    fill_logits_kernel<<<4 * props_.multiProcessorCount, 256, 0, stream_>>>(
        target_bf16.as<__nv_bfloat16>(), draft_bf16.as<__nv_bfloat16>(), batch, K, V,
        opt_.logit_scale, opt_.noise, opt_.seed);
    CHECK(cudaGetLastError());
    DeviceBuffer draft_ids(rows_d * sizeof(int));
    draft_token_kernel<1024><<<unsigned(rows_d), 1024, 0, stream_>>>(
        draft_bf16.as<__nv_bfloat16>(), V, r.temperature, opt_.seed + 1, draft_ids.as<int>());
    CHECK(cudaGetLastError());
    DeviceBuffer out_tokens(rows_t * sizeof(int)), accepted(batch * sizeof(int)),
        emitted(batch * sizeof(int));
    std::vector<uint64_t> seeds(batch), offsets(batch, 12345);
    for (uint32_t b = 0; b < batch; ++b) seeds[b] = opt_.seed + b;
    DeviceBuffer seed_arr = upload(seeds), offset_arr = upload(offsets);

    DeviceBuffer target_f32, draft_f32, target_probs, draft_probs, topk_probs, topp_probs;
    DeviceBuffer temp_t, temp_d, top_k_arr, top_p_arr, air_ws, top1_ids, top1_vals;
    std::vector<Stage> stages;
    const int cast_blocks = 8 * props_.multiProcessorCount;
    const bool pdl = props_.major >= 9;  // flashinfer.softmax: enable_pdl = device_support_pdl

    if (!greedy) {
      target_f32 = DeviceBuffer(nt * 4);
      draft_f32 = DeviceBuffer(nd * 4);
      target_probs = DeviceBuffer(nt * 4);
      draft_probs = DeviceBuffer(nd * 4);
      temp_t = upload(std::vector<float>(rows_t, r.temperature));
      temp_d = upload(std::vector<float>(rows_d, r.temperature));
      stages.push_back({"cast_target", "harness", "bf16 -> fp32, target rows", true, [&, nt] {
        cast_bf16_to_f32_kernel<<<cast_blocks, 256, 0, stream_>>>(
            target_bf16.as<__nv_bfloat16>(), target_f32.as<float>(), nt);
        CHECK(cudaGetLastError());
      }});
      stages.push_back({"cast_draft", "harness", "bf16 -> fp32, draft rows", true, [&, nd] {
        cast_bf16_to_f32_kernel<<<cast_blocks, 256, 0, stream_>>>(
            draft_bf16.as<__nv_bfloat16>(), draft_f32.as<float>(), nd);
        CHECK(cudaGetLastError());
      }});
      stages.push_back({"zero_counters", "api", "cudaMemsetAsync x2 (torch.zeros in chain_speculative_sampling)",
                        false, [&] {
        CHECK(cudaMemsetAsync(accepted.ptr, 0, accepted.bytes, stream_));
        CHECK(cudaMemsetAsync(emitted.ptr, 0, emitted.bytes, stream_));
      }});
      stages.push_back({"softmax_target", "flashinfer",
                        "sampling::OnlineSoftmax<float>(B*(K+1) rows, temperature_arr, enable_pdl=" +
                            std::string(pdl ? "true" : "false") + ")",
                        false, [&, rows_t] {
        CHECK(fs::OnlineSoftmax<float>(target_f32.as<float>(), target_probs.as<float>(),
                                       uint32_t(rows_t), V, temp_t.as<float>(), 1.f,
                                       softmax_ws_.ptr, softmax_ws_.bytes, pdl, stream_));
      }});
      stages.push_back({"softmax_draft", "flashinfer",
                        "sampling::OnlineSoftmax<float>(B*K rows, temperature_arr, enable_pdl=" +
                            std::string(pdl ? "true" : "false") + ")",
                        false, [&, rows_d] {
        CHECK(fs::OnlineSoftmax<float>(draft_f32.as<float>(), draft_probs.as<float>(),
                                       uint32_t(rows_d), V, temp_d.as<float>(), 1.f,
                                       softmax_ws_.ptr, softmax_ws_.bytes, pdl, stream_));
      }});
      float* final_target = target_probs.as<float>();
      if (filtered) {
        topk_probs = DeviceBuffer(nt * 4);
        topp_probs = DeviceBuffer(nt * 4);
        top_k_arr = upload(std::vector<int>(rows_t, opt_.top_k));
        top_p_arr = upload(std::vector<float>(rows_t, opt_.top_p));
        using fs::air_top_p::Counter;
        using fs::air_top_p::HisT;
        using fs::air_top_p::IdxT;
        using fs::air_top_p::NUM_BUCKETS;
        const size_t buf_len = size_t(fs::air_top_p::calcBufLen<float>(IdxT(V)));
        air_ws = DeviceBuffer(align256(sizeof(Counter<float>) * rows_t) +
                              align256(sizeof(HisT<false, float>) * NUM_BUCKETS * rows_t) +
                              align256(sizeof(IdxT) * NUM_BUCKETS * rows_t) +
                              2 * align256(sizeof(float) * buf_len * rows_t));
        stages.push_back({"topk_renorm", "flashinfer",
                          "sampling::RadixTopKRenormProbMultiCTA<float, int>(top_k_arr, deterministic=false)",
                          false, [&, rows_t] {
          CHECK((fs::RadixTopKRenormProbMultiCTA<float, int>(
              target_probs.as<float>(), topk_probs.as<float>(), top_k_arr.as<int>(),
              uint32_t(rows_t), uint32_t(opt_.top_k), V,
              topk_renorm_states_.as<fs::RadixRowState>(), false, stream_)));
        }});
        const bool air = V >= uint32_t(NUM_BUCKETS);
        stages.push_back({"topp_renorm", "flashinfer",
                          air ? "sampling::air_top_p::AirTopPRenormProb<false, float>(top_p_arr)"
                              : "sampling::TopPRenormProb<float>(top_p_arr)",
                          false, [&, rows_t, air] {
          if (air) {
            CHECK((fs::air_top_p::AirTopPRenormProb<false, float>(
                topk_probs.as<float>(), topp_probs.as<float>(), top_p_arr.as<float>(),
                uint32_t(rows_t), opt_.top_p, V, air_ws.ptr, stream_)));
          } else {
            CHECK(fs::TopPRenormProb<float>(topk_probs.as<float>(), topp_probs.as<float>(),
                                            top_p_arr.as<float>(), uint32_t(rows_t), opt_.top_p,
                                            V, stream_));
          }
        }});
        final_target = topp_probs.as<float>();
      }
      stages.push_back({"chain_speculative_sampling", "flashinfer",
                        "sampling::ChainSpeculativeSampling<float, int>(deterministic=true, "
                        "seed_arr/offset_arr per request)",
                        false, [&, batch, final_target] {
        CHECK((fs::ChainSpeculativeSampling<float, int>(
            draft_probs.as<float>(), draft_ids.as<int>(), final_target, out_tokens.as<int>(),
            accepted.as<int>(), emitted.as<int>(), batch, K, V, true,
            seed_arr.as<uint64_t>(), 0, offset_arr.as<uint64_t>(), 0, stream_, 1, 1)));
      }});
    } else {
      top1_ids = DeviceBuffer(rows_t * sizeof(int));
      top1_vals = DeviceBuffer(rows_t * sizeof(__nv_bfloat16));
      stages.push_back({"target_argmax", "flashinfer",
                        "sampling::TopKDispatch<__nv_bfloat16, int>(k=1, sorted=false, "
                        "deterministic=false)",
                        false, [&, rows_t] {
        CHECK((fs::TopKDispatch<__nv_bfloat16, int>(
            target_bf16.as<__nv_bfloat16>(), top1_ids.as<int>(),
            top1_vals.as<__nv_bfloat16>(), uint32_t(rows_t), 1, V,
            top1_states_.as<fs::RadixRowState>(), false, false, fs::TopKTieBreak::None,
            stream_, false)));
      }});
      stages.push_back({"greedy_accept", "harness", "prefix match of drafts and argmax", false,
                        [&, batch] {
        greedy_accept_kernel<<<(batch + 127) / 128, 128, 0, stream_>>>(
            top1_ids.as<int>(), draft_ids.as<int>(), batch, K, out_tokens.as<int>(),
            emitted.as<int>());
        CHECK(cudaGetLastError());
      }});
    }
    CHECK(cudaDeviceSynchronize());  // inputs (cudaMemcpy on the legacy stream) in place

    // (1) The whole pipeline from bf16 logits.
    std::vector<double> times = time_runs(stages, false, nullptr);
    r.us = median(times);
    r.us_min = *std::min_element(times.begin(), times.end());
    r.us_max = *std::max_element(times.begin(), times.end());
    r.reps = int(times.size());
    // Outputs of the last run. The accepted prefix is ChainSpeculativeSampling's
    // output_emitted_draft_token_num (its output_accepted_token_num also counts drafts after
    // the first rejection that would have been accepted, a statistic); greedy_accept_kernel
    // writes the same buffer.
    {
      std::vector<int> acc(batch), out(rows_t);
      CHECK(cudaMemcpy(acc.data(), emitted.ptr, emitted.bytes, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(out.data(), out_tokens.ptr, out_tokens.bytes, cudaMemcpyDeviceToHost));
      double sum = 0;
      for (int a : acc) sum += a;
      r.mean_accepted = sum / batch;
      for (int t : out) r.invalid_tokens += (t < -1 || t >= int(V));
      for (uint32_t b = 0; b < batch; ++b) {
        if (acc[b] < 0 || acc[b] > int(K) || out[size_t(b) * (K + 1) + acc[b]] < 0) ++r.invalid_tokens;
      }
    }
    // (2) Without the casts (FlashInfer's stages from fp32 logits).
    if (!greedy) r.us_from_fp32 = median(time_runs(stages, true, nullptr));
    // (3) Per stage.
    std::vector<std::vector<double>> per_stage(stages.size());
    time_runs(stages, false, &per_stage);
    for (size_t s = 0; s < stages.size(); ++s) stages[s].median_us = median(per_stage[s]);
    for (auto& s : stages) s.run = nullptr;  // the closures refer to this frame's buffers
    r.stages = std::move(stages);
    CHECK(cudaStreamSynchronize(stream_));
    return r;
  }

 private:
  // Runs the stages warmup + reps times, each after an L2 flush; returns the pipeline's µs
  // per timed run, or (per_stage != nullptr) fills the per-stage µs.
  std::vector<double> time_runs(std::vector<Stage>& stages, bool skip_casts,
                                std::vector<std::vector<double>>* per_stage) {
    if (stages.size() + 1 > kMaxEvents) throw BenchError("too many stages");
    std::vector<double> times;
    for (int rep = 0; rep < opt_.warmup + opt_.reps; ++rep) {
      CHECK(cudaMemsetAsync(flush_.ptr, rep & 0xff, flush_bytes_, stream_));
      CHECK(cudaEventRecord(events_[0], stream_));
      size_t recorded = 0;
      for (auto& stage : stages) {
        if (skip_casts && stage.cast) continue;
        stage.run();
        if (per_stage) CHECK(cudaEventRecord(events_[++recorded], stream_));
      }
      if (!per_stage) CHECK(cudaEventRecord(events_[++recorded], stream_));
      CHECK(cudaEventSynchronize(events_[recorded]));
      if (rep < opt_.warmup) continue;
      float ms = 0;
      if (per_stage) {
        for (size_t s = 0; s < stages.size(); ++s) {
          CHECK(cudaEventElapsedTime(&ms, events_[s], events_[s + 1]));
          (*per_stage)[s].push_back(1e3 * ms);
        }
      } else {
        CHECK(cudaEventElapsedTime(&ms, events_[0], events_[recorded]));
        times.push_back(1e3 * ms);
      }
    }
    return times;
  }

  static constexpr size_t kMaxEvents = 16;
  Options opt_;
  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  size_t flush_bytes_ = 0;
  DeviceBuffer flush_, softmax_ws_, topk_renorm_states_, top1_states_;
  cudaEvent_t events_[kMaxEvents]{};
};

// ------------------------------------------------------------------------- output
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (static_cast<unsigned char>(c) < 0x20) out += ' ';
    else out += c;
  }
  return out + "\"";
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

void write_json(FILE* f, const Options& o, const Bench& bench, const std::vector<Result>& results,
                const std::string& date) {
  const auto& p = bench.props();
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::fprintf(f, "{\n  \"info\": {\"flashinfer_version\": %s, \"date\": %s, \"device_name\": %s, "
                  "\"compute_capability\": \"%d.%d\", \"multiprocessors\": %d, \"l2_bytes\": %d, "
                  "\"flush_bytes\": %zu, \"cuda_driver\": %d, \"cuda_runtime\": %d, \"nvcc\": \"%d.%d\", "
                  "\"reps\": %d, \"warmup\": %d, \"seed\": %llu, \"logit_scale\": %s, \"noise\": %s, "
                  "\"logits_dtype\": \"bf16\", \"layout\": \"padded\", "
                  "\"us\": \"median of the whole pipeline from bf16 logits, L2 flushed before each run\", "
                  "\"us_from_fp32\": \"the same without the harness's bf16->fp32 casts\"},\n  \"records\": [\n",
               json_string(o.flashinfer_version).c_str(), json_string(date).c_str(),
               json_string(p.name).c_str(), p.major, p.minor, p.multiProcessorCount, p.l2CacheSize,
               bench.flush_bytes(), driver, runtime, __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__,
               o.reps, o.warmup, o.seed, json_number(o.logit_scale).c_str(),
               json_number(o.noise).c_str());
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    std::fprintf(f, "    {\"mode\": %s, \"B\": %u, \"K\": %u, \"V\": %u, \"dtype\": \"bf16\", "
                    "\"temperature\": %s, \"top_k\": %s, \"top_p\": %s",
                 json_string(r.mode).c_str(), r.batch, r.num_draft, r.vocab,
                 json_number(r.temperature).c_str(),
                 r.top_k < 0 ? "null" : std::to_string(r.top_k).c_str(),
                 r.top_p < 0 ? "null" : json_number(r.top_p).c_str());
    if (!r.skipped.empty()) {
      std::fprintf(f, ", \"skipped\": %s}%s\n", json_string(r.skipped).c_str(),
                   i + 1 < results.size() ? "," : "");
      continue;
    }
    std::fprintf(f, ", \"us\": %s, \"us_min\": %s, \"us_max\": %s, \"reps\": %d, \"us_from_fp32\": %s, "
                    "\"mean_accepted\": %s, \"invalid_outputs\": %ld, \"kernels\": [",
                 json_number(r.us).c_str(), json_number(r.us_min).c_str(),
                 json_number(r.us_max).c_str(), r.reps,
                 r.us_from_fp32 < 0 ? "null" : json_number(r.us_from_fp32).c_str(),
                 json_number(r.mean_accepted).c_str(), r.invalid_tokens);
    for (size_t s = 0; s < r.stages.size(); ++s) {
      const Stage& st = r.stages[s];
      std::fprintf(f, "%s{\"stage\": %s, \"source\": %s, \"call\": %s, \"us\": %s}",
                   s ? ", " : "", json_string(st.name).c_str(), json_string(st.source).c_str(),
                   json_string(st.call).c_str(), json_number(st.median_us).c_str());
    }
    std::fprintf(f, "]}%s\n", i + 1 < results.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
}

void print_table(const std::vector<Result>& results, const Options& o, const Bench& bench) {
  std::printf("### FlashInfer %s speculative-sampling pipeline on %s (K = %u, V = %u, bf16 logits)\n\n",
              o.flashinfer_version.c_str(), bench.props().name, o.num_draft, o.vocab);
  std::printf("| mode | B | µs (from bf16) | µs (from fp32) | accepted | stages (µs) |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    if (!r.skipped.empty()) {
      std::printf("| %s | %u | skipped: %s | | | |\n", r.mode.c_str(), r.batch, r.skipped.c_str());
      continue;
    }
    std::string stages;
    for (const Stage& s : r.stages) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s%s %.1f", stages.empty() ? "" : ", ", s.name.c_str(),
                    s.median_us);
      stages += buf;
    }
    char fp32[32] = "–";
    if (r.us_from_fp32 >= 0) std::snprintf(fp32, sizeof fp32, "%.1f", r.us_from_fp32);
    std::printf("| %s | %u | %.1f | %s | %.2f | %s |\n", r.mode.c_str(), r.batch, r.us, fp32,
                r.mean_accepted, stages.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fi_bench: %s\n", e.what());
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "fi_bench: no CUDA device visible\n");
    return 3;
  }
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));

  int failures = 0;
  std::vector<Result> results;
  try {
    Bench bench(opt);
    std::fprintf(stderr, "fi_bench: FlashInfer %s on %s, flush %zu MiB\n",
                 opt.flashinfer_version.c_str(), bench.props().name, bench.flush_bytes() >> 20);
    for (const auto& mode : opt.modes) {
      for (uint32_t batch : opt.batches) {
        Result r;
        try {
          r = bench.run(mode, batch);
        } catch (const BenchError& e) {
          r.mode = mode;
          r.batch = batch;
          r.num_draft = opt.num_draft;
          r.vocab = opt.vocab;
          r.skipped = std::string("error: ") + e.what();
          ++failures;
          cudaGetLastError();  // clear a non-sticky error; a sticky one fails the next shape too
        }
        if (r.skipped.empty()) {
          std::fprintf(stderr, "fi_bench: %s B=%u: %.1f us (from fp32 %.1f us), accepted %.2f\n",
                       mode.c_str(), batch, r.us, r.us_from_fp32, r.mean_accepted);
        } else {
          std::fprintf(stderr, "fi_bench: %s B=%u: %s\n", mode.c_str(), batch, r.skipped.c_str());
        }
        results.push_back(std::move(r));
      }
    }
    print_table(results, opt, bench);
    if (!opt.out.empty()) {
      FILE* f = std::fopen(opt.out.c_str(), "w");
      if (!f) {
        std::fprintf(stderr, "fi_bench: cannot write %s\n", opt.out.c_str());
        return 4;
      }
      write_json(f, opt, bench, results, date);
      std::fclose(f);
      std::fprintf(stderr, "fi_bench: wrote %s\n", opt.out.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fi_bench: %s\n", e.what());
    return 1;
  }
  return failures ? 1 : 0;
}
