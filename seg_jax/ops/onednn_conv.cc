// 2-D and 3-D float32 convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls.
//
// XLA:CPU's own convolution kernels are 1.2-2.5x slower than oneDNN's on the shapes of
// segmentation models (high resolution, few channels), worst for the weight gradient, and
// its 3-D kernels far slower still. seg_jax/ops/onednn.py builds this file and registers the
// three handlers; seg_jax/ops/conv.py uses them as forward and backward of one convolution.
//
// Layouts are XLA's row-major NHWC / NDHWC activations and HWIO / DHWIO kernels; the rank
// of the input buffer says which. Each handler gets the geometry as attributes: strides,
// kernel dilations (1 = none), paddings; the depth ones are 1, 1, 0, 0 for 2-D convolutions.
//
// Threads: each call splits its batch into one chunk per thread of XLA's intra-op pool and
// runs every chunk single-threaded on that pool (and on the calling thread). oneDNN's own
// OpenMP threads would compete with the pool for the same cores: a convolution called
// from a pool thread while the other pool threads run XLA's fusions oversubscribes them,
// and an OpenMP team stalls whenever one of its threads is descheduled.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);  // libgomp, which libdnnl links

namespace seg_jax {

// Attribute names match seg_jax/ops/onednn.py.
struct ConvAttrs {
  int64_t stride_d, stride_h, stride_w, dilation_d, dilation_h, dilation_w, pad_front, pad_back,
      pad_top, pad_bottom, pad_left, pad_right;
};

}  // namespace seg_jax

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    seg_jax::ConvAttrs, xla::ffi::StructMember<int64_t>("stride_d"),
    xla::ffi::StructMember<int64_t>("stride_h"),
    xla::ffi::StructMember<int64_t>("stride_w"), xla::ffi::StructMember<int64_t>("dilation_d"),
    xla::ffi::StructMember<int64_t>("dilation_h"),
    xla::ffi::StructMember<int64_t>("dilation_w"), xla::ffi::StructMember<int64_t>("pad_front"),
    xla::ffi::StructMember<int64_t>("pad_back"), xla::ffi::StructMember<int64_t>("pad_top"),
    xla::ffi::StructMember<int64_t>("pad_bottom"), xla::ffi::StructMember<int64_t>("pad_left"),
    xla::ffi::StructMember<int64_t>("pad_right"));

namespace seg_jax {
namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dims = ffi::AnyBuffer::Dimensions;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN sizes its work for omp_get_max_threads() of the creating and executing thread.
void SingleThreaded() {
  thread_local bool set = false;
  if (!set) {
    omp_set_num_threads(1);
    set = true;
  }
}

struct Geometry {
  bool volumetric;  // NDHWC / DHWIO; else NHWC / HWIO, with d = od = kd = 1
  int64_t n, d, h, w, ci, od, oh, ow, co, kd, kh, kw;
  int64_t stride_d, stride_h, stride_w, dilation_d, dilation_h, dilation_w;
  int64_t pad_front, pad_back, pad_top, pad_bottom, pad_left, pad_right;

  auto Key() const {
    return std::make_tuple(volumetric, n, d, h, w, ci, od, oh, ow, co, kd, kh, kw, stride_d,
                           stride_h, stride_w, dilation_d, dilation_h, dilation_w, pad_front,
                           pad_back, pad_top, pad_bottom, pad_left, pad_right);
  }
  Geometry WithBatch(int64_t batch) const {
    Geometry g = *this;
    g.n = batch;
    return g;
  }
  int64_t SrcImage() const { return d * h * w * ci; }   // floats per image
  int64_t DstImage() const { return od * oh * ow * co; }
  // oneDNN orders dims N, C, spatial whatever the memory layout.
  memory::dims Dims(int64_t batch, int64_t channels, int64_t depth, int64_t height,
                    int64_t width) const {
    if (volumetric) return {batch, channels, depth, height, width};
    return {batch, channels, height, width};
  }
  memory::desc Activations(int64_t channels, int64_t depth, int64_t height, int64_t width) const {
    return {Dims(n, channels, depth, height, width), memory::data_type::f32,
            volumetric ? Tag::ndhwc : Tag::nhwc};
  }
  memory::desc Src() const { return Activations(ci, d, h, w); }
  memory::desc Dst() const { return Activations(co, od, oh, ow); }
  memory::desc WeightsHwio() const {
    return {Dims(co, ci, kd, kh, kw), memory::data_type::f32, volumetric ? Tag::dhwio : Tag::hwio};
  }
  // oneDNN picks its own (blocked) weight layout; weights are small, so reordering is cheap.
  memory::desc WeightsAny() const {
    return {Dims(co, ci, kd, kh, kw), memory::data_type::f32, Tag::any};
  }
  memory::dims Spatial(int64_t depth, int64_t height, int64_t width) const {
    if (volumetric) return {depth, height, width};
    return {height, width};
  }
  memory::dims Strides() const { return Spatial(stride_d, stride_h, stride_w); }
  memory::dims Dilations() const {  // oneDNN: 0 = none
    return Spatial(dilation_d - 1, dilation_h - 1, dilation_w - 1);
  }
  memory::dims PadBegin() const { return Spatial(pad_front, pad_top, pad_left); }
  memory::dims PadEnd() const { return Spatial(pad_back, pad_bottom, pad_right); }

  static dnnl::primitive_attr Attr() {  // scratch memory per call: chunks run concurrently
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            Src(), WeightsAny(), Dst(), Strides(), Dilations(), PadBegin(), PadEnd(), Attr()};
  }
};

using Key = decltype(std::declval<Geometry>().Key());

// x [N, (D,) H, W, Ci], kernel [(KD,) KH, KW, Ci, Co], y [N, (OD,) OH, OW, Co].
Geometry MakeGeometry(Dims x, Dims kernel, Dims y, const ConvAttrs& a) {
  if (x.size() == 5) {
    return {true, x[0], x[1], x[2], x[3], x[4], y[1], y[2], y[3], y[4], kernel[0], kernel[1],
            kernel[2], a.stride_d, a.stride_h, a.stride_w, a.dilation_d, a.dilation_h,
            a.dilation_w, a.pad_front, a.pad_back, a.pad_top, a.pad_bottom, a.pad_left,
            a.pad_right};
  }
  return {false, x[0], 1, x[1], x[2], x[3], 1, y[1], y[2], y[3], 1, kernel[0], kernel[1],
          1, a.stride_h, a.stride_w, 1, a.dilation_h, a.dilation_w, 0, 0, a.pad_top,
          a.pad_bottom, a.pad_left, a.pad_right};
}

// A primitive, the weight layout it wants and its scratch size, built once per geometry.
template <typename Primitive>
struct Entry {
  Primitive primitive;
  memory::desc weights;
  memory::desc scratchpad;
};

template <typename Primitive, typename Build>
const Entry<Primitive>& Cached(const Geometry& g, Build build) {
  static std::mutex mu;
  static std::map<Key, Entry<Primitive>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(g.Key());
  if (it == cache.end()) it = cache.emplace(g.Key(), build(g)).first;
  return it->second;
}

void Execute(const dnnl::primitive& p, std::unordered_map<int, memory> args,
             const memory::desc& scratchpad) {
  SingleThreaded();
  dnnl::stream stream(Engine());
  if (scratchpad.get_size()) args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine()));
  p.execute(stream, args);
  stream.wait();
}

memory Reordered(const memory& from, const memory::desc& to_desc) {
  memory to(to_desc, Engine());
  Execute(dnnl::reorder(from, to), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}}, memory::desc());
  return to;
}

memory PrimitiveWeights(const Geometry& g, const memory::desc& wanted, const float* hwio) {
  memory user(g.WeightsHwio(), Engine(), const_cast<float*>(hwio));
  return wanted == user.get_desc() ? user : Reordered(user, wanted);
}

// Images [begin, end) of each chunk: the batch split as evenly as possible over `parts`.
std::vector<std::pair<int64_t, int64_t>> Chunks(int64_t batch, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(batch, parts));
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t i = 0, begin = 0; i < parts; ++i) {
    int64_t end = begin + batch / parts + (i < batch % parts ? 1 : 0);
    chunks.emplace_back(begin, end);
    begin = end;
  }
  return chunks;
}

// Runs body(i) for every chunk i, on the calling thread and on XLA's intra-op pool. Chunks
// are claimed from a shared counter, so a pool task that starts late (its thread busy with
// another op) finds nothing left and returns without touching `body`.
template <typename Body>
void ParallelFor(ffi::ThreadPool* pool, int64_t chunks, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      body(i);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == chunks) state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < chunks; ++t) pool->Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {  // e.g. bad_alloc: never let it cross into XLA
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("seg_jax oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

int64_t Parallelism(ffi::ThreadPool* pool) { return std::max<int64_t>(1, pool->num_threads()); }

// The primitive of each chunk's batch size (at most two sizes).
template <typename Primitive, typename Build>
std::vector<const Entry<Primitive>*> ChunkEntries(
    const Geometry& g, const std::vector<std::pair<int64_t, int64_t>>& chunks, Build build) {
  std::vector<const Entry<Primitive>*> entries;
  for (auto [begin, end] : chunks) entries.push_back(&Cached<Primitive>(g.WithBatch(end - begin), build));
  return entries;
}

// The kernel in the layout each chunk's primitive wants, reordered once per distinct layout.
template <typename Primitive>
std::vector<memory> ChunkWeights(const Geometry& g, const std::vector<const Entry<Primitive>*>& entries,
                                 const float* hwio) {
  std::vector<memory> weights;
  for (size_t i = 0; i < entries.size(); ++i) {
    bool same = i > 0 && entries[i]->weights == entries[i - 1]->weights;
    weights.push_back(same ? weights.back() : PrimitiveWeights(g, entries[i]->weights, hwio));
  }
  return weights;
}

// Forward and input gradient: the kernel applied to each chunk of images, `from` (in the
// layout of `from_is_src` ? the input : the output) to `to` (the other).
template <typename Primitive, typename Build>
void PerImageChunks(ffi::ThreadPool* pool, const Geometry& g, Build build, const float* kernel,
                    int from_arg, const float* from, bool from_is_src, int to_arg, float* to) {
  auto chunks = Chunks(g.n, Parallelism(pool));
  auto entries = ChunkEntries<Primitive>(g, chunks, build);
  auto weights = ChunkWeights(g, entries, kernel);
  ParallelFor(pool, chunks.size(), [&](int64_t i) {
    auto [begin, end] = chunks[i];
    Geometry c = g.WithBatch(end - begin);
    memory from_images(from_is_src ? c.Src() : c.Dst(), Engine(),
                       const_cast<float*>(from) + begin * (from_is_src ? g.SrcImage() : g.DstImage()));
    memory to_images(from_is_src ? c.Dst() : c.Src(), Engine(),
                     to + begin * (from_is_src ? g.DstImage() : g.SrcImage()));
    Execute(entries[i]->primitive,
            {{from_arg, from_images}, {DNNL_ARG_WEIGHTS, weights[i]}, {to_arg, to_images}},
            entries[i]->scratchpad);
  });
}

ffi::Error Forward(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, ConvAttrs a) {
  return Guarded([&] {
    SingleThreaded();
    Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), a);
    PerImageChunks<dnnl::convolution_forward>(&thread_pool, g, [](const Geometry& c) {
      auto pd = c.Forward();
      return Entry<dnnl::convolution_forward>{dnnl::convolution_forward(pd), pd.weights_desc(),
                                              pd.scratchpad_desc()};
    }, kernel.typed_data(), DNNL_ARG_SRC, x.typed_data(), true, DNNL_ARG_DST, y->typed_data());
  });
}

ffi::Error BackwardData(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                        ConvAttrs a) {
  return Guarded([&] {
    SingleThreaded();
    Geometry g = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), a);
    PerImageChunks<dnnl::convolution_backward_data>(&thread_pool, g, [](const Geometry& c) {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, c.Src(), c.WeightsAny(), c.Dst(),
          c.Strides(), c.Dilations(), c.PadBegin(), c.PadEnd(), c.Forward(), Geometry::Attr());
      return Entry<dnnl::convolution_backward_data>{dnnl::convolution_backward_data(pd),
                                                    pd.weights_desc(), pd.scratchpad_desc()};
    }, kernel.typed_data(), DNNL_ARG_DIFF_DST, dy.typed_data(), false, DNNL_ARG_DIFF_SRC,
       dx->typed_data());
  });
}

ffi::Error BackwardWeights(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                           ConvAttrs a) {
  return Guarded([&] {
    SingleThreaded();
    ffi::ThreadPool* pool = &thread_pool;
    Geometry g = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), a);
    auto chunks = Chunks(g.n, Parallelism(pool));
    auto entries = ChunkEntries<dnnl::convolution_backward_weights>(g, chunks, [](const Geometry& c) {
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, c.Src(), c.WeightsAny(), c.Dst(),
          c.Strides(), c.Dilations(), c.PadBegin(), c.PadEnd(), c.Forward(), Geometry::Attr());
      return Entry<dnnl::convolution_backward_weights>{dnnl::convolution_backward_weights(pd),
                                                       pd.diff_weights_desc(), pd.scratchpad_desc()};
    });
    // Each chunk's partial gradient, in HWIO; their sum is the kernel gradient.
    const int64_t size = g.kd * g.kh * g.kw * g.ci * g.co;
    std::vector<std::vector<float>> partial(chunks.size() - 1, std::vector<float>(size));
    ParallelFor(pool, chunks.size(), [&](int64_t i) {
      auto [begin, end] = chunks[i];
      Geometry c = g.WithBatch(end - begin);
      memory hwio(g.WeightsHwio(), Engine(), i == 0 ? dkernel->typed_data() : partial[i - 1].data());
      bool direct = entries[i]->weights == hwio.get_desc();
      memory out = direct ? hwio : memory(entries[i]->weights, Engine());
      Execute(entries[i]->primitive,
              {{DNNL_ARG_SRC, memory(c.Src(), Engine(), x.typed_data() + begin * g.SrcImage())},
               {DNNL_ARG_DIFF_DST, memory(c.Dst(), Engine(), dy.typed_data() + begin * g.DstImage())},
               {DNNL_ARG_DIFF_WEIGHTS, out}},
              entries[i]->scratchpad);
      if (!direct) {
        Execute(dnnl::reorder(out, hwio), {{DNNL_ARG_FROM, out}, {DNNL_ARG_TO, hwio}}, memory::desc());
      }
    });
    float* sum = dkernel->typed_data();
    for (const auto& p : partial) {
      for (int64_t j = 0; j < size; ++j) sum[j] += p[j];
    }
  });
}

}  // namespace
}  // namespace seg_jax

#define SEG_JAX_CONV_HANDLER(symbol, impl)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, seg_jax::impl,                                  \
      xla::ffi::Ffi::Bind()                                                             \
          .Ctx<xla::ffi::ThreadPool>()                                                  \
          .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                                       \
          .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                                       \
          .Ret<xla::ffi::Buffer<xla::ffi::F32>>()                                       \
          .Attrs<seg_jax::ConvAttrs>())

SEG_JAX_CONV_HANDLER(SegJaxConvForward, Forward);
SEG_JAX_CONV_HANDLER(SegJaxConvBackwardData, BackwardData);
SEG_JAX_CONV_HANDLER(SegJaxConvBackwardWeights, BackwardWeights);
