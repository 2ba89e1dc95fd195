// Fuzz target: safetensors_file::parse over arbitrary bytes. A hostile file
// must end in semoe::error; any other exception, a sanitizer report or a
// broken invariant of an accepted file aborts.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "semoe/io/safetensors.hpp"

#define FUZZ_ASSERT(cond)                                                                  \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "%s:%d: invariant violated: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

namespace {

namespace sio = semoe::io;

template <class T>
void typed_read(const sio::safetensors_file& f, const sio::tensor_info& t) {
  std::vector<T> v(static_cast<std::size_t>(t.elements()));
  f.read_as(t.name, std::span<T>(v));
}

void read_typed(const sio::safetensors_file& f, const sio::tensor_info& t) {
  switch (t.type) {
    case sio::dtype::boolean: {
      std::unique_ptr<bool[]> b(new bool[static_cast<std::size_t>(t.elements())]);
      try {
        f.read_as(t.name, std::span<bool>(b.get(), static_cast<std::size_t>(t.elements())));
      } catch (const semoe::error&) {  // a BOOL byte other than 0 or 1
      }
      break;
    }
    case sio::dtype::u8: typed_read<std::uint8_t>(f, t); break;
    case sio::dtype::i8: typed_read<std::int8_t>(f, t); break;
    case sio::dtype::i16: typed_read<std::int16_t>(f, t); break;
    case sio::dtype::u16: typed_read<std::uint16_t>(f, t); break;
    case sio::dtype::i32: typed_read<std::int32_t>(f, t); break;
    case sio::dtype::u32: typed_read<std::uint32_t>(f, t); break;
    case sio::dtype::f32: typed_read<float>(f, t); break;
    case sio::dtype::f64: typed_read<double>(f, t); break;
    case sio::dtype::i64: typed_read<std::int64_t>(f, t); break;
    case sio::dtype::u64: typed_read<std::uint64_t>(f, t); break;
    default: break;  // F16, BF16, F8: bytes only
  }
}

/// What the reader accepted must hold together, read back byte for byte, and
/// survive the writer: its header parses to the same tensors and metadata.
void check_accepted(const sio::safetensors_file& f, const std::uint8_t* data, std::size_t size) {
  FUZZ_ASSERT(f.data_offset() >= 8 && f.data_offset() <= size);
  std::uint64_t covered = 0;
  sio::safetensors_writer w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  for (std::size_t i = 0; i < f.tensors().size(); ++i) {
    const auto& t = f.tensors()[i];
    if (i > 0) FUZZ_ASSERT(f.tensors()[i - 1].name < t.name);
    FUZZ_ASSERT(t.begin <= t.end && t.end <= size - f.data_offset());
    std::uint64_t elements = 1;
    for (auto d : t.shape) {
      FUZZ_ASSERT(d >= 0);
      elements *= static_cast<std::uint64_t>(d);  // cannot wrap: validated
    }
    FUZZ_ASSERT(elements * sio::dtype_size(t.type) == t.bytes());
    FUZZ_ASSERT(&f.at(t.name) == &t);
    covered += t.bytes();
    std::vector<std::byte> buf(static_cast<std::size_t>(t.bytes()));
    f.read(t.name, buf);
    FUZZ_ASSERT(t.bytes() == 0 || std::memcmp(buf.data(), data + f.data_offset() + t.begin, buf.size()) == 0);
    read_typed(f, t);
    w.add(t.name, t.type, t.shape, buf);
  }
  FUZZ_ASSERT(covered == size - f.data_offset());

  const std::string h = w.header();
  FUZZ_ASSERT(h.size() % 8 == 0);
  std::string again(8, '\0');
  for (int i = 0; i < 8; ++i) again[i] = static_cast<char>(std::uint64_t{h.size()} >> (8 * i));
  again += h;
  again.append(static_cast<std::size_t>(covered), '\0');
  const auto g = sio::safetensors_file::parse(std::as_bytes(std::span<const char>(again.data(), again.size())));
  FUZZ_ASSERT(g.metadata() == f.metadata());
  FUZZ_ASSERT(g.tensors().size() == f.tensors().size());
  for (std::size_t i = 0; i < g.tensors().size(); ++i) {
    const auto &a = f.tensors()[i], &b = g.tensors()[i];
    FUZZ_ASSERT(a.name == b.name && a.type == b.type && a.shape == b.shape && a.bytes() == b.bytes());
    FUZZ_ASSERT(b.begin % sio::dtype_size(b.type) == 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = sio::safetensors_file::parse(std::as_bytes(std::span<const std::uint8_t>(data, size)));
    check_accepted(f, data, size);
  } catch (const semoe::error&) {
  }
  return 0;
}

namespace {

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

std::string file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string written(const sio::safetensors_writer& w, std::size_t data_bytes, char fill = '\x01') {
  return file(w.header(), std::string(data_bytes, fill));
}

}  // namespace

/// For the stand-in driver: the file parses.
bool fuzz_accepts(const std::string& in) {
  try {
    (void)sio::safetensors_file::parse(std::as_bytes(std::span<const char>(in.data(), in.size())));
    return true;
  } catch (const semoe::error&) {
    return false;
  }
}

/// Seeds for the stand-in driver (driver.cpp): valid files of every dtype and
/// the hostile shapes the unit tests refuse.
std::vector<std::string> fuzz_seeds() {
  std::vector<std::string> s;
  {
    sio::safetensors_writer w;
    w.set_metadata("format", "pt");
    std::size_t bytes = 0;
    int k = 0;
    for (const auto& d : sio::detail::dtype_table) {
      const std::vector<std::int64_t> shape = k % 3 == 0 ? std::vector<std::int64_t>{} : std::vector<std::int64_t>{2, k % 4};
      std::size_t n = sio::dtype_size(d.type);
      for (auto x : shape) n *= static_cast<std::size_t>(x);
      w.add(sio::expert_tensor_name(k / 4, k % 4, "w1.weight"), d.type, shape, std::vector<std::byte>(n, std::byte{1}));
      bytes += n;
      ++k;
    }
    s.push_back(written(w, bytes));
  }
  {
    sio::safetensors_writer w;
    s.push_back(written(w, 0));
    w.add("attn0", sio::dtype::f32, {1, 1, 2, 3}, std::vector<std::byte>(24));
    s.push_back(written(w, 24));
    w.add("empty", sio::dtype::f64, {0, 3}, {});
    w.set_metadata("k\"\\\n", "\xc3\xa9");
    s.push_back(written(w, 24));
  }
  const std::string f32x2(8, '\0');
  const auto one = [&](const std::string& entry, const std::string& data) { return file("{\"w\":" + entry + "}", data); };
  s.push_back(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})", f32x2));
  s.push_back(file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                   f32x2));
  s.push_back(file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[1],"data_offsets":[6,7]}})",
                   f32x2));
  s.push_back(one(R"({"dtype":"F33","shape":[2],"data_offsets":[0,8]})", f32x2));
  s.push_back(one(R"({"dtype":"F64","shape":[2],"data_offsets":[0,8]})", f32x2));
  s.push_back(one(R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})", f32x2));
  s.push_back(one(R"({"dtype":"F32","shape":[-2],"data_offsets":[-8,0]})", f32x2));
  s.push_back(one(R"({"dtype":"BOOL","shape":[8],"data_offsets":[0,8]})", std::string("\x00\x01\x02\x01\x00\x00\x01\xff", 8)));
  s.push_back(one(R"({"dtype":"F32","shape":[2],"dtype":"F32","data_offsets":[0,8]})", f32x2));
  s.push_back(file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                   f32x2));
  s.push_back(file(R"({"__metadata__":{"a":"1","a":2}})", ""));
  s.push_back(file("[1,2]", ""));
  s.push_back(le64(std::uint64_t{1} << 63) + "{}");
  s.push_back(std::string("\x08\0\0\0\0", 5));
  return s;
}
