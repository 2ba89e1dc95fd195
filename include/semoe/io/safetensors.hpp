// semoe/io/safetensors.hpp: Hugging Face safetensors files, read with every
// header field checked before it is used and written atomically.
//
// File: u64 little-endian N | N bytes of UTF-8 JSON header | data buffer.
// The header maps each tensor name to {"dtype": "F32", "shape": [d0, ...],
// "data_offsets": [begin, end]} (byte offsets into the data buffer) and may
// hold "__metadata__": {string: string}. The reader accepts exactly what
// Hugging Face's own loader accepts: the tensors must cover the data buffer
// without gaps, overlaps or trailing bytes. The writer produces the bytes HF's
// serializer produces: tensors ordered by dtype alignment (largest first) then
// name, so each one starts aligned to its element size, and the header padded
// with spaces to a multiple of 8 bytes.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "semoe/core/error.hpp"

namespace semoe::io {

static_assert(std::endian::native == std::endian::little,
              "semoe::io::safetensors: tensor data is little-endian and is copied as is; "
              "a big-endian host would need a byte swap on every read and write");

/// Element types, in the order of Hugging Face's Dtype enum (increasing
/// alignment): the writer's layout, and so its bytes, depend on this order.
enum class dtype : std::uint8_t { boolean, u8, i8, f8_e5m2, f8_e4m3, f8_e8m0, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64 };

/// The largest header open() and parse() accept unless told otherwise.
inline constexpr std::size_t safetensors_max_header = std::size_t{100} << 20;

namespace detail {

struct dtype_desc {
  dtype type;
  std::string_view name;
  std::size_t size;
};

inline constexpr std::array<dtype_desc, 16> dtype_table{{
    {dtype::boolean, "BOOL", 1}, {dtype::u8, "U8", 1},           {dtype::i8, "I8", 1},
    {dtype::f8_e5m2, "F8_E5M2", 1}, {dtype::f8_e4m3, "F8_E4M3", 1}, {dtype::f8_e8m0, "F8_E8M0", 1},
    {dtype::i16, "I16", 2},      {dtype::u16, "U16", 2},         {dtype::f16, "F16", 2},
    {dtype::bf16, "BF16", 2},    {dtype::i32, "I32", 4},         {dtype::u32, "U32", 4},
    {dtype::f32, "F32", 4},      {dtype::f64, "F64", 8},         {dtype::i64, "I64", 8},
    {dtype::u64, "U64", 8},
}};

template <class>
inline constexpr bool always_false = false;

}  // namespace detail

/// The name the header uses ("F32", "BF16", ...).
constexpr std::string_view dtype_name(dtype t) { return detail::dtype_table[static_cast<std::size_t>(t)].name; }

/// Bytes per element.
constexpr std::size_t dtype_size(dtype t) { return detail::dtype_table[static_cast<std::size_t>(t)].size; }

/// The dtype a header name stands for; nullopt for a name safetensors does not define.
constexpr std::optional<dtype> parse_dtype(std::string_view name) {
  for (const auto& d : detail::dtype_table)
    if (d.name == name) return d.type;
  return std::nullopt;
}

/// The dtype of a C++ element type: read_as and add<T> use it to refuse a
/// tensor of another type instead of reinterpreting its bytes.
template <class T>
struct dtype_of {
  static_assert(detail::always_false<T>,
                "semoe::io::dtype_of<T>: T has no safetensors dtype; use bool, float, double or a <cstdint> "
                "integer, or read()/add() raw bytes with an explicit dtype (F16, BF16, F8_*)");
};
template <class T, dtype D>
struct dtype_of_constant {
  static constexpr dtype value = D;
};
template <> struct dtype_of<bool> : dtype_of_constant<bool, dtype::boolean> {};
template <> struct dtype_of<std::uint8_t> : dtype_of_constant<std::uint8_t, dtype::u8> {};
template <> struct dtype_of<std::int8_t> : dtype_of_constant<std::int8_t, dtype::i8> {};
template <> struct dtype_of<std::int16_t> : dtype_of_constant<std::int16_t, dtype::i16> {};
template <> struct dtype_of<std::uint16_t> : dtype_of_constant<std::uint16_t, dtype::u16> {};
template <> struct dtype_of<std::int32_t> : dtype_of_constant<std::int32_t, dtype::i32> {};
template <> struct dtype_of<std::uint32_t> : dtype_of_constant<std::uint32_t, dtype::u32> {};
template <> struct dtype_of<float> : dtype_of_constant<float, dtype::f32> {};
template <> struct dtype_of<double> : dtype_of_constant<double, dtype::f64> {};
template <> struct dtype_of<std::int64_t> : dtype_of_constant<std::int64_t, dtype::i64> {};
template <> struct dtype_of<std::uint64_t> : dtype_of_constant<std::uint64_t, dtype::u64> {};
template <class T>
inline constexpr dtype dtype_of_v = dtype_of<std::remove_cv_t<T>>::value;

/// One tensor of a file: [begin, end) is its byte range in the data buffer.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;

  std::uint64_t bytes() const { return end - begin; }
  std::uint64_t elements() const { return bytes() / dtype_size(type); }
};

namespace detail {

using json = nlohmann::json;

inline std::string where(const std::string& source) { return "semoe::io::safetensors: '" + source + "': "; }

/// A JSON value for an error message, cut short: it came from a hostile file.
inline std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 64) s = s.substr(0, 61) + "...";
  return s;
}

inline std::string dtype_names() {
  std::string s;
  for (const auto& d : dtype_table) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

inline std::uint64_t load_le64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

/// A JSON integer >= 0 (nlohmann keeps "-0" and small literals as signed).
inline std::optional<std::uint64_t> as_u64(const json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  return std::nullopt;
}

/// A non-negative integer field or an error that says what it is instead.
inline std::uint64_t field_u64(const json& v, const std::string& who, const std::string& what) {
  if (auto u = as_u64(v)) return *u;
  SEMOE_CHECK(!v.is_number_integer(), who, what, " = ", show(v), " is negative");
  ::semoe::detail::fail(who, what, " = ", show(v), " is a JSON ", v.type_name(), "; expected a non-negative integer");
}

inline tensor_info parse_entry(const std::string& name, const json& v, std::uint64_t data_bytes,
                               const std::string& where_) {
  const std::string who = where_ + "tensor '" + name + "': ";
  SEMOE_CHECK(v.is_object(), who, "entry is a JSON ", v.type_name(),
              "; expected an object with \"dtype\", \"shape\" and \"data_offsets\"");
  const auto field = [&](const char* key) -> const json& {
    const auto it = v.find(key);
    SEMOE_CHECK(it != v.end(), who, "entry has no \"", key, "\"");
    return *it;
  };
  tensor_info t;
  t.name = name;

  const json& jd = field("dtype");
  SEMOE_CHECK(jd.is_string(), who, "\"dtype\" is a JSON ", jd.type_name(), "; expected a string such as \"F32\"");
  const auto type = parse_dtype(jd.get_ref<const std::string&>());
  SEMOE_CHECK(type, who, "unknown dtype ", show(jd), "; expected one of ", dtype_names());
  t.type = *type;

  const json& js = field("shape");
  SEMOE_CHECK(js.is_array(), who, "\"shape\" is a JSON ", js.type_name(), "; expected an array of integers");
  std::uint64_t elements = 1;
  bool overflow = false;
  t.shape.reserve(js.size());  // bounded: the parsed header already holds them
  for (std::size_t i = 0; i < js.size(); ++i) {
    const std::uint64_t d = field_u64(js[i], who, "shape[" + std::to_string(i) + "]");
    SEMOE_CHECK(d <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), who, "shape[", i, "] = ", d,
                " is larger than 2^63 - 1");
    // Checked left to right like HF's loader: [2^40, 2^40, 0] overflows before the 0.
    overflow = overflow || (d != 0 && elements > std::numeric_limits<std::uint64_t>::max() / d);
    SEMOE_CHECK(!overflow, who, "shape ", show(js), " has more elements than 2^64 - 1");
    elements *= d;
    t.shape.push_back(static_cast<std::int64_t>(d));
  }

  const json& jo = field("data_offsets");
  SEMOE_CHECK(jo.is_array() && jo.size() == 2, who, "\"data_offsets\" = ", show(jo), "; expected [begin, end]");
  t.begin = field_u64(jo[0], who, "data_offsets[0]");
  t.end = field_u64(jo[1], who, "data_offsets[1]");
  SEMOE_CHECK(t.begin <= t.end, who, "data_offsets [", t.begin, ", ", t.end, "] end before they begin");
  SEMOE_CHECK(t.end <= data_bytes, who, "data_offsets [", t.begin, ", ", t.end, "] run past the end of the data buffer (",
              data_bytes, " bytes)");
  const std::uint64_t size = dtype_size(t.type);
  SEMOE_CHECK(elements <= std::numeric_limits<std::uint64_t>::max() / size, who, "shape ", show(js), " of ",
              dtype_name(t.type), " is more than 2^64 - 1 bytes");
  SEMOE_CHECK(elements * size == t.end - t.begin, who, "shape ", show(js), " of ", dtype_name(t.type), " is ",
              elements * size, " bytes but data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin);
  return t;
}

inline constexpr std::size_t max_header_depth = 16;
inline constexpr std::size_t max_header_array = 1024;  // a shape of more dims than any framework allows
inline constexpr std::size_t max_header_tensors = std::size_t{1} << 18;  // real checkpoints hold tens of thousands
inline constexpr std::size_t max_header_keys = std::size_t{1} << 16;     // keys of one object below the top

struct parsed_header {
  std::vector<tensor_info> tensors;  // by name
  std::map<std::string, std::string> metadata;
};

/// The first pass over a header: a SAX handler that keeps no values, only
/// what checks need. nlohmann keeps one of two equal keys silently, so every
/// key is watched as it is parsed, one set per open object; nesting, array
/// length and key counts are capped (a valid header nests 3 deep with short
/// arrays, while "[[[[..." would cost a DOM ~75 bytes and "[0,0,..." ~16
/// bytes per byte of header). Linear in the header: nothing is revisited.
class header_checker {
 public:
  using json_t = nlohmann::json;
  explicit header_checker(const std::string& where) : where_(where) {}

  bool null() { return value(); }
  bool boolean(bool) { return value(); }
  bool number_integer(json_t::number_integer_t) { return value(); }
  bool number_unsigned(json_t::number_unsigned_t) { return value(); }
  bool number_float(json_t::number_float_t, const json_t::string_t&) { return value(); }
  bool string(json_t::string_t&) { return value(); }
  bool binary(json_t::binary_t&) { return value(); }
  bool start_object(std::size_t) { return start(false); }
  bool start_array(std::size_t) { return start(true); }
  bool end_object() { return end(); }
  bool end_array() { return end(); }
  bool key(json_t::string_t& k) {
    if (open_.empty()) return true;
    auto& f = open_.back();
    if (open_.size() == 1) {
      top_key_ = k;
      SEMOE_CHECK(f.keys.size() < max_header_tensors, where_, "the header has more than ", max_header_tensors,
                  " tensors");
      SEMOE_CHECK(f.keys.insert(k).second, where_, owner(), " appears twice in the header");
    } else {
      SEMOE_CHECK(f.keys.size() < max_header_keys, where_, inside(), "an object has more than ", max_header_keys,
                  " keys");
      SEMOE_CHECK(f.keys.insert(k).second, where_, inside(), "key \"", k, "\" appears twice");
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    ::semoe::detail::fail(where_, "header is not valid UTF-8 JSON: ", e.what());
  }

 private:
  struct frame {
    bool array = false;
    std::size_t elements = 0;
    std::unordered_set<std::string> keys;
  };
  std::string owner() const {
    return top_key_ == "__metadata__" ? std::string("\"__metadata__\"") : "tensor '" + top_key_ + "'";
  }
  std::string inside() const {  // "tensor 'w': " once within a top-level entry
    return !open_.empty() && !open_.front().array && !top_key_.empty() ? owner() + ": " : std::string();
  }
  bool value() {
    if (!open_.empty() && open_.back().array)
      SEMOE_CHECK(++open_.back().elements <= max_header_array, where_, inside(), "an array has more than ",
                  max_header_array, " elements");
    return true;
  }
  bool start(bool array) {
    value();
    SEMOE_CHECK(open_.size() < max_header_depth, where_, inside(), "the header nests deeper than ", max_header_depth,
                " levels; a safetensors header nests 3");
    open_.push_back({array, 0, {}});
    return true;
  }
  bool end() {
    if (!open_.empty()) open_.pop_back();
    return true;
  }

  const std::string& where_;
  std::vector<frame> open_;
  std::string top_key_;
};

/// Validates a header against a data buffer of data_bytes bytes: the checks
/// of header_checker, then a plain DOM parse of what passed them.
inline parsed_header parse_header(std::string_view text, std::uint64_t data_bytes, const std::string& where_) {
  header_checker checker(where_);
  json j;
  try {
    json::sax_parse(text.begin(), text.end(), &checker);
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    ::semoe::detail::fail(where_, "header is not valid UTF-8 JSON: ", e.what());
  }
  SEMOE_CHECK(j.is_object(), where_, "header is a JSON ", j.type_name(), "; expected an object");

  parsed_header h;
  for (const auto& [key, v] : j.items()) {  // std::map order: by name
    if (key == "__metadata__") {
      SEMOE_CHECK(v.is_object(), where_, "\"__metadata__\" is a JSON ", v.type_name(),
                  "; expected an object of strings");
      for (const auto& [mk, mv] : v.items()) {
        SEMOE_CHECK(mv.is_string(), where_, "\"__metadata__\" key '", mk, "' is a JSON ", mv.type_name(),
                    "; expected a string");
        h.metadata.emplace(mk, mv.get<std::string>());
      }
    } else {
      h.tensors.push_back(parse_entry(key, v, data_bytes, where_));
    }
  }

  // The tensors must tile the data buffer: in offset order, each begins where
  // the previous one ends and the last ends at the end of the buffer.
  std::vector<const tensor_info*> by_offset;
  by_offset.reserve(h.tensors.size());
  for (const auto& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const tensor_info* a, const tensor_info* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::uint64_t at = 0;
  const tensor_info* prev = nullptr;
  for (const tensor_info* t : by_offset) {
    SEMOE_CHECK(t->begin >= at, where_, "tensor '", t->name, "' (bytes [", t->begin, ", ", t->end,
                ")) overlaps tensor '", prev ? prev->name : "", "' (bytes [", prev ? prev->begin : 0, ", ", at, "))");
    SEMOE_CHECK(t->begin == at, where_, "tensor '", t->name, "' begins at byte ", t->begin, " but ",
                prev ? "tensor '" + prev->name + "' ends" : std::string("the data buffer starts"), " at byte ", at,
                "; safetensors requires the tensors to cover the data buffer without gaps");
    at = t->end;
    prev = t;
  }
  SEMOE_CHECK(at == data_bytes, where_, "the tensors cover ", at, " of the ", data_bytes,
              " bytes of the data buffer", prev ? " (the last, '" + prev->name + "', ends there)" : std::string(),
              "; safetensors requires every byte after the header to belong to a tensor");
  return h;
}

/// Reads exactly n bytes at offset off, or throws: a file that shrinks under
/// us is an error, not a short tensor.
inline void pread_exact(int fd, void* dst, std::size_t n, std::uint64_t off, const std::string& who) {
  auto* out = static_cast<unsigned char*>(dst);
  while (n > 0) {
    const std::size_t want = std::min<std::size_t>(n, std::size_t{1} << 30);
    const ssize_t got = ::pread(fd, out, want, static_cast<off_t>(off));
    if (got < 0 && errno == EINTR) continue;
    SEMOE_CHECK(got >= 0, who, "read at byte ", off, " failed: ", std::strerror(errno));
    SEMOE_CHECK(got > 0, who, "file ends at byte ", off, ", before the ", n, " bytes still expected (truncated while open?)");
    out += got;
    n -= static_cast<std::size_t>(got);
    off += static_cast<std::uint64_t>(got);
  }
}

inline void write_all(int fd, const void* src, std::size_t n, const std::string& who) {
  const auto* in = static_cast<const unsigned char*>(src);
  while (n > 0) {
    const ssize_t put = ::write(fd, in, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (put < 0 && errno == EINTR) continue;
    SEMOE_CHECK(put > 0, who, "write failed: ", put < 0 ? std::strerror(errno) : "no progress");
    in += put;
    n -= static_cast<std::size_t>(put);
  }
}

/// Writes a file atomically: fill(fd) writes "<path>.tmp", which is fsynced
/// and renamed over `path`, then the directory is fsynced. A crash or an
/// error leaves the old file or the new one, never part of one (the
/// temporary is removed on error). `who` starts every error message.
template <class F>
void write_atomically(const std::filesystem::path& path, const std::string& who, F&& fill) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  const std::string at = who + ": '" + tmp.string() + "': ";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  SEMOE_CHECK(fd >= 0, at, "cannot create: ", std::strerror(errno));
  try {
    fill(fd, at);
    SEMOE_CHECK(::fsync(fd) == 0, at, "fsync failed: ", std::strerror(errno));
    const int rc = ::close(std::exchange(fd, -1));
    SEMOE_CHECK(rc == 0, at, "close failed: ", std::strerror(errno));
    SEMOE_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, at, "rename to '", path.string(), "' failed: ",
                std::strerror(errno));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  SEMOE_CHECK(dfd >= 0, who, ": cannot open directory '", dir.string(), "': ", std::strerror(errno));
  const int rc = ::fsync(dfd);
  const int e = errno;
  ::close(dfd);
  SEMOE_CHECK(rc == 0, who, ": fsync of directory '", dir.string(), "' failed: ", std::strerror(e));
}

/// Throws unless s can be written as a JSON string (valid UTF-8).
inline void check_utf8(const std::string& s, const std::string& who, const char* what) {
  try {
    (void)json(s).dump();
  } catch (const json::exception&) {
    ::semoe::detail::fail(who, what, " is not valid UTF-8");
  }
}

}  // namespace detail

/// A safetensors file whose header has been validated; tensor data is read on
/// demand, by pread from the file or by copy from the bytes given to parse().
/// Reads are const and safe to issue from several threads at once.
class safetensors_file {
 public:
  /// Opens and validates `path`; the header may not exceed max_header_bytes.
  static safetensors_file open(const std::filesystem::path& path, std::size_t max_header_bytes = safetensors_max_header) {
    safetensors_file f;
    f.source_ = path.string();
    const std::string where = detail::where(f.source_);
    f.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    SEMOE_CHECK(f.fd_ >= 0, where, "cannot open: ", std::strerror(errno));
    struct stat st {};
    SEMOE_CHECK(::fstat(f.fd_, &st) == 0, where, "fstat failed: ", std::strerror(errno));
    SEMOE_CHECK(S_ISREG(st.st_mode), where, "not a regular file");
    const auto size = static_cast<std::uint64_t>(st.st_size);
    SEMOE_CHECK(size >= 8, where, "file holds ", size, " bytes; a safetensors file starts with an 8-byte header length");
    unsigned char head[8];
    detail::pread_exact(f.fd_, head, 8, 0, where);
    const std::uint64_t n = checked_header_length(detail::load_le64(head), size, max_header_bytes, where);
    std::string text(static_cast<std::size_t>(n), '\0');
    detail::pread_exact(f.fd_, text.data(), text.size(), 8, where);
    f.adopt(detail::parse_header(text, size - 8 - n, where), 8 + n);
    return f;
  }

  /// Validates a whole file held in memory. The returned object reads tensor
  /// data from `bytes`, which must outlive it. `source` names it in errors.
  static safetensors_file parse(std::span<const std::byte> bytes, std::size_t max_header_bytes = safetensors_max_header,
                                std::string source = "<memory>") {
    safetensors_file f;
    f.source_ = std::move(source);
    const std::string where = detail::where(f.source_);
    const std::uint64_t size = bytes.size();
    SEMOE_CHECK(size >= 8, where, "holds ", size, " bytes; a safetensors file starts with an 8-byte header length");
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
    const std::uint64_t n = checked_header_length(detail::load_le64(p), size, max_header_bytes, where);
    const std::string_view text(reinterpret_cast<const char*>(p) + 8, static_cast<std::size_t>(n));
    f.adopt(detail::parse_header(text, size - 8 - n, where), 8 + n);
    f.mem_ = bytes.data();
    return f;
  }

  safetensors_file(safetensors_file&& o) noexcept { *this = std::move(o); }
  safetensors_file& operator=(safetensors_file&& o) noexcept {
    if (this != &o) {
      close();
      source_ = std::move(o.source_);
      fd_ = std::exchange(o.fd_, -1);
      mem_ = std::exchange(o.mem_, nullptr);
      data_offset_ = o.data_offset_;
      tensors_ = std::move(o.tensors_);
      metadata_ = std::move(o.metadata_);
    }
    return *this;
  }
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;
  ~safetensors_file() { close(); }

  /// The path, or the name given to parse().
  const std::string& source() const { return source_; }
  /// Every tensor, sorted by name.
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  /// The "__metadata__" strings.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Where the data buffer starts in the file: 8 + header length.
  std::uint64_t data_offset() const { return data_offset_; }

  bool contains(std::string_view name) const { return find(name) != nullptr; }

  const tensor_info& at(std::string_view name) const {
    const tensor_info* t = find(name);
    SEMOE_CHECK(t, detail::where(source_), "no tensor named '", name, "'");
    return *t;
  }

  /// Copies the tensor's bytes into `out`, which must be exactly its size.
  void read(std::string_view name, std::span<std::byte> out) const {
    const tensor_info& t = at(name);
    SEMOE_CHECK(out.size() == t.bytes(), detail::where(source_), "tensor '", name, "' holds ", t.bytes(),
                " bytes; the output has ", out.size());
    if (out.empty()) return;
    if (mem_)
      std::memcpy(out.data(), mem_ + data_offset_ + t.begin, out.size());
    else
      detail::pread_exact(fd_, out.data(), out.size(), data_offset_ + t.begin,
                          detail::where(source_) + "tensor '" + std::string(name) + "': ");
  }

  /// Reads a tensor whose dtype is T's (float <-> F32, std::int32_t <-> I32,
  /// ...) into `out`, which must hold exactly its elements. BOOL tensors are
  /// checked to hold only 0 and 1.
  template <class T>
  void read_as(std::string_view name, std::span<T> out) const {
    static_assert(!std::is_const_v<T>, "semoe::io::safetensors_file::read_as: the output span must be writable");
    constexpr dtype want = dtype_of_v<T>;
    static_assert(sizeof(T) == dtype_size(want));
    const tensor_info& t = at(name);
    SEMOE_CHECK(t.type == want, detail::where(source_), "tensor '", name, "' is ", dtype_name(t.type),
                "; read_as asked for ", dtype_name(want));
    SEMOE_CHECK(out.size() == t.elements(), detail::where(source_), "tensor '", name, "' holds ", t.elements(),
                " elements; the output has ", out.size());
    const auto bytes = std::as_writable_bytes(out);
    read(name, bytes);
    if constexpr (std::is_same_v<std::remove_cv_t<T>, bool>) {
      const auto bad = std::find_if(bytes.begin(), bytes.end(), [](std::byte b) { return b > std::byte{1}; });
      if (bad != bytes.end()) {
        const auto at_ = bad - bytes.begin();
        const int value = std::to_integer<int>(*bad);
        std::fill(bytes.begin(), bytes.end(), std::byte{0});  // never leave invalid bools behind
        ::semoe::detail::fail(detail::where(source_), "tensor '", name, "': BOOL element ", at_, " is ", value,
                              "; expected 0 or 1");
      }
    }
  }

  /// read_as into a new vector.
  template <class T>
  std::vector<T> read_as(std::string_view name) const {
    static_assert(!std::is_same_v<T, bool>, "semoe::io::safetensors_file::read_as<bool>(name): std::vector<bool> "
                                            "packs bits; pass a std::span<bool> (e.g. of a std::unique_ptr<bool[]>)");
    std::vector<T> v(static_cast<std::size_t>(at(name).elements()));  // bounded by the validated file size
    read_as(name, std::span<T>(v));
    return v;
  }

 private:
  safetensors_file() = default;

  static std::uint64_t checked_header_length(std::uint64_t n, std::uint64_t size, std::size_t max, const std::string& where) {
    SEMOE_CHECK(n <= max, where, "header length ", n, " exceeds max_header_bytes = ", max);
    SEMOE_CHECK(n <= size - 8, where, "header length ", n, " runs past the end of the file (", size, " bytes)");
    return n;
  }

  void adopt(detail::parsed_header&& h, std::uint64_t data_offset) {
    tensors_ = std::move(h.tensors);
    metadata_ = std::move(h.metadata);
    data_offset_ = data_offset;
  }

  const tensor_info* find(std::string_view name) const {
    const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                     [](const tensor_info& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  std::string source_;
  int fd_ = -1;
  const std::byte* mem_ = nullptr;
  std::uint64_t data_offset_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and writes them as one safetensors file. add() copies the
/// data, so the caller's buffers may change or go away before write().
class safetensors_writer {
 public:
  void add(std::string name, dtype type, std::vector<std::int64_t> shape, std::span<const std::byte> data) {
    const std::string who = "semoe::io::safetensors_writer::add: tensor '" + name + "': ";
    SEMOE_CHECK(name != "__metadata__", who, "the name is reserved for the header's metadata");
    detail::check_utf8(name, who, "the name");
    SEMOE_CHECK(!entries_.contains(name), who, "added twice");
    std::uint64_t elements = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      SEMOE_CHECK(shape[i] >= 0, who, "shape[", i, "] = ", shape[i], "; expected >= 0");
      const auto d = static_cast<std::uint64_t>(shape[i]);
      SEMOE_CHECK(d == 0 || elements <= std::numeric_limits<std::uint64_t>::max() / d, who,
                  "the shape has more than 2^64 - 1 elements");
      elements *= d;
    }
    SEMOE_CHECK(elements <= std::numeric_limits<std::uint64_t>::max() / dtype_size(type) &&
                    elements * dtype_size(type) == data.size(),
                who, elements, " elements of ", dtype_name(type), " need ", elements * dtype_size(type),
                " bytes; the data has ", data.size());
    entries_.emplace(name, entry{type, std::move(shape), std::vector<std::byte>(data.begin(), data.end())});
  }

  /// Typed data from any contiguous range (std::span, std::vector, std::array):
  /// the dtype is T's (see dtype_of).
  template <std::ranges::contiguous_range R>
    requires std::ranges::sized_range<R>
  void add(std::string name, std::vector<std::int64_t> shape, const R& data) {
    using T = std::ranges::range_value_t<R>;
    add(std::move(name), dtype_of_v<T>, std::move(shape),
        std::as_bytes(std::span<const T>(std::ranges::data(data), std::ranges::size(data))));
  }

  /// A "__metadata__" entry; setting a key again replaces its value.
  void set_metadata(std::string key, std::string value) {
    const std::string who = "semoe::io::safetensors_writer::set_metadata: key '" + key + "': ";
    detail::check_utf8(key, who, "the key");
    detail::check_utf8(value, who, "the value");
    metadata_[std::move(key)] = std::move(value);
  }

  std::size_t size() const { return entries_.size(); }

  /// The header as written: JSON padded with spaces to a multiple of 8 bytes,
  /// tensors in layout order (largest dtype alignment first, then name).
  std::string header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto* e : layout()) {
      nlohmann::ordered_json t = nlohmann::ordered_json::object();
      t["dtype"] = dtype_name(e->second.type);
      t["shape"] = e->second.shape;
      t["data_offsets"] = {offset, offset + e->second.data.size()};
      offset += e->second.data.size();
      h[e->first] = std::move(t);
    }
    std::string s = h.dump();
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }

  /// Writes the file to `path` atomically: to "<path>.tmp", fsync, rename over
  /// `path`, fsync the directory. A crash leaves the old file or the new one.
  void write(const std::filesystem::path& path) const {
    const std::string h = header();
    detail::write_atomically(path, "semoe::io::safetensors_writer::write", [&](int fd, const std::string& who) {
      unsigned char len[8];
      for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(std::uint64_t{h.size()} >> (8 * i));
      detail::write_all(fd, len, 8, who);
      detail::write_all(fd, h.data(), h.size(), who);
      for (const auto* e : layout()) detail::write_all(fd, e->second.data.data(), e->second.data.size(), who);
    });
  }

 private:
  struct entry {
    dtype type;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };
  using map_t = std::map<std::string, entry, std::less<>>;

  // HF's order: descending dtype (so descending alignment), then name. Every
  // tensor then starts at a multiple of its element size.
  std::vector<const map_t::value_type*> layout() const {
    std::vector<const map_t::value_type*> v;
    v.reserve(entries_.size());
    for (const auto& e : entries_) v.push_back(&e);
    std::stable_sort(v.begin(), v.end(), [](const auto* a, const auto* b) { return a->second.type > b->second.type; });
    return v;
  }

  map_t entries_;
  std::map<std::string, std::string> metadata_;
};

/// A Hugging Face MoE expert tensor name: expert_tensor_name(3, 5, "w1.weight")
/// is "model.layers.3.mlp.experts.5.w1.weight".
inline std::string expert_tensor_name(index_t layer, index_t expert, std::string_view part) {
  SEMOE_CHECK(layer >= 0, "semoe::io::expert_tensor_name: layer = ", layer, "; expected >= 0");
  SEMOE_CHECK(expert >= 0, "semoe::io::expert_tensor_name: expert = ", expert, "; expected >= 0");
  SEMOE_CHECK(!part.empty(), "semoe::io::expert_tensor_name: part is empty; expected e.g. \"w1.weight\"");
  return "model.layers." + std::to_string(layer) + ".mlp.experts." + std::to_string(expert) + "." + std::string(part);
}

}  // namespace semoe::io
