#include "semoe/io/safetensors.hpp"

#include <doctest/doctest.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace sio = semoe::io;

namespace {

/// A scratch directory removed at the end of the test.
struct scratch_dir {
  fs::path path;
  scratch_dir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("semoe_safetensors_test_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path file(const std::string& name) const { return path / name; }
};

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

/// A file as the format defines it: length, header, data.
std::string st_bytes(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string pad8(std::string header) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return header;
}

template <class T>
std::string raw(std::initializer_list<T> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * sizeof(T));
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  REQUIRE(f);
  REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  std::fclose(f);
}

std::string read_file(const fs::path& p) {
  std::string b(fs::file_size(p), '\0');
  std::FILE* f = std::fopen(p.c_str(), "rb");
  REQUIRE(f);
  REQUIRE(std::fread(b.data(), 1, b.size(), f) == b.size());
  std::fclose(f);
  return b;
}

std::span<const std::byte> as_span(const std::string& s) { return std::as_bytes(std::span<const char>(s.data(), s.size())); }

std::string error_of_parse(const std::string& bytes) {
  try {
    (void)sio::safetensors_file::parse(as_span(bytes));
  } catch (const semoe::error& e) {
    return e.what();
  }
  return "";
}

/// The file is refused, from disk and from memory, with a message that names
/// the file and holds every one of `expect`.
void check_refused(const std::string& bytes, std::initializer_list<std::string> expect) {
  scratch_dir dir;
  const fs::path p = dir.file("hostile.safetensors");
  write_file(p, bytes);
  std::string from_file;
  try {
    (void)sio::safetensors_file::open(p);
  } catch (const semoe::error& e) {
    from_file = e.what();
  }
  const std::string from_memory = error_of_parse(bytes);
  INFO("file error: ", from_file);
  INFO("memory error: ", from_memory);
  REQUIRE(!from_file.empty());
  REQUIRE(!from_memory.empty());
  CHECK(from_file.find(p.string()) != std::string::npos);
  CHECK(from_memory.find("<memory>") != std::string::npos);
  for (const auto& s : expect) {
    CHECK_MESSAGE(from_file.find(s) != std::string::npos, "missing '", s, "'");
    CHECK_MESSAGE(from_memory.find(s) != std::string::npos, "missing '", s, "'");
  }
}

const std::string f32x2 = raw<float>({1.0f, 2.0f});  // 8 bytes

}  // namespace

TEST_CASE_TEMPLATE("safetensors: round trip of every element type", T, float, double, std::int8_t, std::uint8_t,
                   std::int16_t, std::uint16_t, std::int32_t, std::uint32_t, std::int64_t, std::uint64_t) {
  scratch_dir dir;
  std::vector<T> v(6);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(3 * i + 1);
  sio::safetensors_writer w;
  w.add("m", {2, 3}, v);
  w.write(dir.file("t.safetensors"));
  const auto f = sio::safetensors_file::open(dir.file("t.safetensors"));
  REQUIRE(f.tensors().size() == 1);
  CHECK(f.at("m").type == sio::dtype_of_v<T>);
  CHECK(f.at("m").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.read_as<T>("m") == v);
}

TEST_CASE("safetensors: round trip of several tensors, a 0-sized one and a scalar") {
  scratch_dir dir;
  const fs::path p = dir.file("model.safetensors");
  const std::vector<float> a{1.5f, -2.0f, 3.25f, 4.0f, 5.0f, 6.0f};
  const std::vector<double> b{1e300, -1e-300, 0.5};
  const std::vector<std::int32_t> c{-7, 8, 2147483647, -2147483647 - 1};
  const std::vector<std::int64_t> d{std::int64_t{1} << 62};
  const std::vector<std::uint8_t> e{1, 2, 3, 4, 5};
  const std::array<std::uint16_t, 2> bf16_bits{0x3f80, 0xc000};  // 1.0, -2.0 in bfloat16
  const std::array<bool, 3> flags{true, false, true};
  const std::vector<float> empty;
  const std::array<float, 1> scalar{42.0f};

  sio::safetensors_writer w;
  w.add("a", {2, 3}, a);
  w.add("b", {3}, b);
  w.add("c", {2, 2}, c);
  w.add("d", {1}, d);
  w.add("e", {5}, e);
  w.add("half", sio::dtype::bf16, {2}, std::as_bytes(std::span(bf16_bits)));
  w.add("flags", {3}, flags);
  w.add("empty", {0, 4}, empty);
  w.add("scalar", {}, scalar);
  CHECK(w.size() == 9);
  w.write(p);

  const auto check = [&](const sio::safetensors_file& f) {
    REQUIRE(f.tensors().size() == 9);
    std::vector<std::string> names;
    for (const auto& t : f.tensors()) names.push_back(t.name);
    CHECK(names == std::vector<std::string>{"a", "b", "c", "d", "e", "empty", "flags", "half", "scalar"});
    CHECK(f.data_offset() % 8 == 0);
    for (const auto& t : f.tensors()) CHECK_MESSAGE(t.begin % sio::dtype_size(t.type) == 0, t.name, " is misaligned");
    CHECK(f.read_as<float>("a") == a);
    CHECK(f.read_as<double>("b") == b);
    CHECK(f.read_as<std::int32_t>("c") == c);
    CHECK(f.read_as<std::int64_t>("d") == d);
    CHECK(f.read_as<std::uint8_t>("e") == e);
    CHECK(f.at("c").shape == std::vector<std::int64_t>{2, 2});
    CHECK(f.at("half").type == sio::dtype::bf16);
    std::array<std::uint16_t, 2> half{};
    f.read("half", std::as_writable_bytes(std::span(half)));
    CHECK(half == bf16_bits);
    std::array<bool, 3> got_flags{};
    f.read_as("flags", std::span<bool>(got_flags));
    CHECK(got_flags == flags);
    CHECK(f.at("empty").shape == std::vector<std::int64_t>{0, 4});
    CHECK(f.at("empty").bytes() == 0);
    CHECK(f.read_as<float>("empty").empty());
    CHECK(f.at("scalar").shape.empty());
    CHECK(f.read_as<float>("scalar") == std::vector<float>{42.0f});
    CHECK(f.contains("a"));
    CHECK(!f.contains("z"));
    CHECK(f.metadata().empty());
  };
  check(sio::safetensors_file::open(p));
  const std::string bytes = read_file(p);
  check(sio::safetensors_file::parse(as_span(bytes)));
}

TEST_CASE("safetensors: metadata round trip") {
  scratch_dir dir;
  sio::safetensors_writer w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "quotes \" backslash \\ newline \n tab \t bell \x07 unicode \xc3\xa9\xe2\x82\xac");
  w.set_metadata("empty", "");
  w.set_metadata("format", "np");  // replaces
  w.add("x", {2}, std::span<const float>(reinterpret_cast<const float*>(f32x2.data()), 2));
  w.write(dir.file("m.safetensors"));
  const auto f = sio::safetensors_file::open(dir.file("m.safetensors"));
  const std::map<std::string, std::string> want{
      {"format", "np"},
      {"note", "quotes \" backslash \\ newline \n tab \t bell \x07 unicode \xc3\xa9\xe2\x82\xac"},
      {"empty", ""}};
  CHECK(f.metadata() == want);
  CHECK(f.read_as<float>("x") == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("safetensors: read_as refuses another dtype, read an inexact size") {
  scratch_dir dir;
  sio::safetensors_writer w;
  w.add("w", {2, 2}, std::vector<float>{1, 2, 3, 4});
  w.write(dir.file("w.safetensors"));
  const auto f = sio::safetensors_file::open(dir.file("w.safetensors"));
  std::vector<std::int32_t> ints(4);
  CHECK_THROWS_WITH_AS(f.read_as("w", std::span<std::int32_t>(ints)),
                       doctest::Contains("tensor 'w' is F32; read_as asked for I32"), semoe::error);
  CHECK_THROWS_WITH_AS(f.read_as<double>("w"), doctest::Contains("read_as asked for F64"), semoe::error);
  std::vector<float> three(3);
  CHECK_THROWS_WITH_AS(f.read_as("w", std::span<float>(three)),
                       doctest::Contains("tensor 'w' holds 4 elements; the output has 3"), semoe::error);
  std::vector<std::byte> bytes(17);
  CHECK_THROWS_WITH_AS(f.read("w", bytes), doctest::Contains("tensor 'w' holds 16 bytes; the output has 17"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(f.read("nope", bytes), doctest::Contains("no tensor named 'nope'"), semoe::error);
  bytes.resize(16);
  f.read("w", bytes);
  float first;
  std::memcpy(&first, bytes.data(), 4);
  CHECK(first == 1.0f);
}

TEST_CASE("safetensors: BOOL bytes other than 0 and 1 are refused by read_as<bool>") {
  const std::string h = pad8(R"({"b":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})");
  const std::string bytes = st_bytes(h, std::string("\x01\x00\x02", 3));
  const auto f = sio::safetensors_file::parse(as_span(bytes));
  std::array<bool, 3> out{};
  CHECK_THROWS_WITH_AS(f.read_as("b", std::span<bool>(out)), doctest::Contains("BOOL element 2 is 2"), semoe::error);
  std::array<std::byte, 3> rawb{};
  f.read("b", rawb);  // the bytes themselves are readable
  CHECK(rawb[2] == std::byte{2});
}

TEST_CASE("safetensors: the writer produces the bytes the Hugging Face format specifies") {
  scratch_dir dir;
  const std::vector<float> v{0, 1, 2, 3, 4, 5};

  SUBCASE("one F32 tensor: header padded with spaces to 8 bytes") {
    sio::safetensors_writer w;
    w.add("attn0", {1, 1, 2, 3}, v);
    w.write(dir.file("a.safetensors"));
    const std::string json = R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})";
    const std::string header = json + std::string((8 - json.size() % 8) % 8, ' ');
    const std::string data(reinterpret_cast<const char*>(v.data()), 24);
    const std::string want = le64(header.size()) + header + data;
    CHECK(header.size() == 72);  // as in HF's own test of this tensor (test_serialization_forced_alignement)
    CHECK(read_file(dir.file("a.safetensors")) == want);
  }
  SUBCASE("no tensors") {
    sio::safetensors_writer w;
    w.write(dir.file("e.safetensors"));
    CHECK(read_file(dir.file("e.safetensors")) == le64(8) + "{}      ");  // HF's test_empty
    CHECK(sio::safetensors_file::open(dir.file("e.safetensors")).tensors().empty());
  }
  SUBCASE("metadata first, then tensors by descending alignment, then name") {
    sio::safetensors_writer w;
    w.set_metadata("format", "pt");
    w.add("a", {3}, std::vector<std::uint8_t>{7, 8, 9});
    w.add("c", {1}, std::vector<float>{1.0f});
    w.add("b", {1}, std::vector<float>{2.0f});
    w.add("d", {1}, std::vector<std::int64_t>{-1});
    w.write(dir.file("m.safetensors"));
    const std::string json =
        R"({"__metadata__":{"format":"pt"},)"
        R"("d":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
        R"("c":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
        R"("a":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}})";
    const std::string want = st_bytes(pad8(json), raw<std::int64_t>({-1}) + raw<float>({2.0f, 1.0f}) + "\x07\x08\x09");
    CHECK(w.header() == pad8(json));
    CHECK(read_file(dir.file("m.safetensors")) == want);
  }
  SUBCASE("a file written by another writer: spaces, other key order, no padding") {
    const std::string header =
        "{ \"x\" : { \"data_offsets\" : [ 0 , 8 ] , \"shape\" : [ 2 ] , \"dtype\" : \"F32\" } ,\n"
        "  \"__metadata__\" : { \"k\" : \"v\" } }";
    const std::string bytes = st_bytes(header, f32x2);
    const auto f = sio::safetensors_file::parse(as_span(bytes));
    CHECK(f.read_as<float>("x") == std::vector<float>{1.0f, 2.0f});
    CHECK(f.metadata().at("k") == "v");
    CHECK(f.data_offset() == 8 + header.size());
  }
}

TEST_CASE("safetensors: hostile files are refused with an error naming the tensor") {
  const auto one = [](const std::string& entry, const std::string& data) {
    return st_bytes(pad8("{\"w\":" + entry + "}"), data);
  };
  SUBCASE("offsets past the end of the data") {
    check_refused(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})", f32x2),
                  {"tensor 'w'", "run past the end of the data buffer (8 bytes)"});
  }
  SUBCASE("truncated data") {
    const std::string full = one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", f32x2);
    check_refused(full.substr(0, full.size() - 1), {"tensor 'w'", "run past the end"});
  }
  SUBCASE("overlapping tensors") {
    check_refused(st_bytes(pad8(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
                           f32x2),
                  {"tensor 'b'", "overlaps tensor 'a'"});
  }
  SUBCASE("a gap between tensors") {
    check_refused(st_bytes(pad8(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                R"("b":{"dtype":"U8","shape":[1],"data_offsets":[6,7]}})"),
                           f32x2),
                  {"tensor 'b'", "begins at byte 6 but tensor 'a' ends at byte 4", "without gaps"});
  }
  SUBCASE("bytes after the last tensor") {
    check_refused(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})", f32x2),
                  {"cover 4 of the 8 bytes", "'w'"});
  }
  SUBCASE("unknown dtype") {
    check_refused(one(R"({"dtype":"F33","shape":[2],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "unknown dtype \"F33\""});
    check_refused(one(R"({"dtype":"float32","shape":[2],"data_offsets":[0,8]})", f32x2), {"tensor 'w'", "F32"});
  }
  SUBCASE("shape and size disagree") {
    check_refused(one(R"({"dtype":"F64","shape":[2],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "is 16 bytes but data_offsets [0, 8] hold 8"});
  }
  SUBCASE("shape whose size overflows") {
    check_refused(one(R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})", f32x2),
                  {"tensor 'w'", "more elements than 2^64 - 1"});
    check_refused(one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "more than 2^64 - 1 bytes"});
    check_refused(one(R"({"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "larger than 2^63 - 1"});
    check_refused(one(R"({"dtype":"U8","shape":[1e3],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "shape[0] = 1000.0 is a JSON number"});
  }
  SUBCASE("negative shape and offsets") {
    check_refused(one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "shape[0] = -2 is negative"});
    check_refused(one(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})", f32x2),
                  {"tensor 'w'", "data_offsets[0] = -8 is negative"});
    check_refused(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,-8]})", f32x2),
                  {"tensor 'w'", "data_offsets[1] = -8 is negative"});
  }
  SUBCASE("offsets that end before they begin") {
    check_refused(one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})", f32x2),
                  {"tensor 'w'", "end before they begin"});
  }
  SUBCASE("missing or mistyped fields") {
    check_refused(one(R"({"shape":[2],"data_offsets":[0,8]})", f32x2), {"tensor 'w'", "no \"dtype\""});
    check_refused(one(R"({"dtype":"F32","data_offsets":[0,8]})", f32x2), {"tensor 'w'", "no \"shape\""});
    check_refused(one(R"({"dtype":"F32","shape":[2]})", f32x2), {"tensor 'w'", "no \"data_offsets\""});
    check_refused(one(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})", f32x2), {"tensor 'w'", "\"dtype\" is a JSON number"});
    check_refused(one(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})", f32x2), {"tensor 'w'", "\"shape\" is a JSON number"});
    check_refused(one(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})", f32x2), {"tensor 'w'", "shape[0] = \"2\""});
    check_refused(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,9]})", f32x2), {"tensor 'w'", "expected [begin, end]"});
    check_refused(one(R"({"dtype":"F32","shape":[2],"data_offsets":{"0":8}})", f32x2), {"tensor 'w'", "expected [begin, end]"});
    check_refused(one(R"([1,2])", f32x2), {"tensor 'w'", "entry is a JSON array"});
  }
  SUBCASE("duplicate names") {
    check_refused(st_bytes(pad8(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
                           f32x2),
                  {"tensor 'w' appears twice"});
    check_refused(one(R"({"dtype":"F32","shape":[2],"dtype":"F32","data_offsets":[0,8]})", f32x2),
                  {"tensor 'w'", "key \"dtype\" appears twice"});
    check_refused(st_bytes(pad8(R"({"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
                           f32x2),
                  {"\"__metadata__\"", "key \"a\" appears twice"});
  }
  SUBCASE("header that is not an object, not JSON or not UTF-8") {
    check_refused(st_bytes(pad8("[1,2]"), ""), {"header is a JSON array; expected an object"});
    check_refused(st_bytes(pad8("\"w\""), ""), {"header is a JSON string"});
    check_refused(st_bytes(pad8("{\"w\":"), ""), {"not valid UTF-8 JSON"});
    check_refused(st_bytes(pad8("{\"w\xff\":1}"), ""), {"not valid UTF-8 JSON"});
    check_refused(st_bytes(pad8("{} {}"), ""), {"not valid UTF-8 JSON"});
    check_refused(st_bytes("", ""), {"not valid UTF-8 JSON"});
    check_refused(st_bytes("{\"w\":" + std::string(1000, '['), ""), {"tensor 'w'", "nests deeper than 16 levels"});
    std::string wide = R"({"w":{"dtype":"U8","shape":[1)";
    for (int i = 0; i < 1024; ++i) wide += ",1";
    check_refused(st_bytes(wide + R"(],"data_offsets":[0,1]}})", "x"), {"tensor 'w'", "more than 1024 elements"});
  }
  SUBCASE("bad metadata") {
    check_refused(st_bytes(pad8(R"({"__metadata__":{"n":1}})"), ""), {"\"__metadata__\" key 'n' is a JSON number"});
    check_refused(st_bytes(pad8(R"({"__metadata__":[]})"), ""), {"\"__metadata__\" is a JSON array"});
  }
  SUBCASE("header length beyond the file or the limit") {
    check_refused(le64(std::uint64_t{1} << 63) + "{}", {"header length 9223372036854775808 exceeds max_header_bytes"});
    check_refused(le64(~std::uint64_t{0}) + "{}", {"exceeds max_header_bytes"});
    check_refused(le64(3) + "{}", {"header length 3 runs past the end of the file (10 bytes)"});
    check_refused(le64(1000) + "{}", {"runs past the end of the file"});
  }
  SUBCASE("truncated before the header length") {
    check_refused("", {"holds 0 bytes"});
    check_refused(std::string("\x08\0\0\0\0", 5), {"holds 5 bytes"});
  }
}

TEST_CASE("safetensors: max_header_bytes bounds the header") {
  const std::string bytes = st_bytes(pad8(R"({"__metadata__":{"k":"v"}})"), "");
  CHECK_NOTHROW((void)sio::safetensors_file::parse(as_span(bytes), 32));
  CHECK_THROWS_WITH_AS((void)sio::safetensors_file::parse(as_span(bytes), 16, "small"),
                       doctest::Contains("'small': header length 32 exceeds max_header_bytes = 16"), semoe::error);
}

TEST_CASE("safetensors: open refuses what is not a readable file") {
  scratch_dir dir;
  CHECK_THROWS_WITH_AS((void)sio::safetensors_file::open(dir.file("missing")), doctest::Contains("cannot open"),
                       semoe::error);
  CHECK_THROWS_WITH_AS((void)sio::safetensors_file::open(dir.path), doctest::Contains("not a regular file"),
                       semoe::error);
}

TEST_CASE("safetensors: the writer refuses inconsistent tensors") {
  sio::safetensors_writer w;
  const std::vector<float> four{1, 2, 3, 4};
  CHECK_THROWS_WITH_AS(w.add("x", {3}, four), doctest::Contains("tensor 'x': 3 elements of F32 need 12 bytes; the data has 16"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(w.add("x", {-1, -4}, four), doctest::Contains("shape[0] = -1"), semoe::error);
  CHECK_THROWS_WITH_AS(w.add("__metadata__", {4}, four), doctest::Contains("reserved"), semoe::error);
  CHECK_THROWS_WITH_AS(w.add("bad\xff", {4}, four), doctest::Contains("not valid UTF-8"), semoe::error);
  CHECK_THROWS_WITH_AS(w.set_metadata("k", "\xc3"), doctest::Contains("key 'k': the value is not valid UTF-8"),
                       semoe::error);
  w.add("x", {4}, four);
  CHECK_THROWS_WITH_AS(w.add("x", {2, 2}, four), doctest::Contains("tensor 'x': added twice"), semoe::error);
  CHECK(w.size() == 1);
}

TEST_CASE("safetensors: writing replaces a file atomically") {
  scratch_dir dir;
  const fs::path p = dir.file("ckpt.safetensors");
  const fs::path tmp = dir.file("ckpt.safetensors.tmp");
  sio::safetensors_writer old_w, new_w;
  old_w.add("v", {1}, std::vector<float>{1.0f});
  new_w.add("v", {2}, std::vector<float>{2.0f, 3.0f});
  old_w.write(p);
  CHECK(!fs::exists(tmp));
  new_w.write(p);
  CHECK(!fs::exists(tmp));
  CHECK(sio::safetensors_file::open(p).read_as<float>("v") == std::vector<float>{2.0f, 3.0f});

  SUBCASE("a failed write leaves the old file") {
    fs::create_directory(tmp);  // the temporary cannot be created
    CHECK_THROWS_WITH_AS(old_w.write(p), doctest::Contains("cannot create"), semoe::error);
    CHECK(sio::safetensors_file::open(p).read_as<float>("v") == std::vector<float>{2.0f, 3.0f});
    fs::remove(tmp);
  }
  SUBCASE("a failed rename removes the temporary") {
    const fs::path d = dir.file("a_directory");
    fs::create_directory(d);
    fs::create_directory(d / "child");  // rename over a non-empty directory fails
    CHECK_THROWS_WITH_AS(old_w.write(d), doctest::Contains("rename"), semoe::error);
    CHECK(!fs::exists(dir.file("a_directory.tmp")));
    CHECK(fs::is_directory(d / "child"));
  }
  SUBCASE("an open reader keeps reading the file it opened") {
    const auto f = sio::safetensors_file::open(p);
    old_w.write(p);
    CHECK(f.read_as<float>("v") == std::vector<float>{2.0f, 3.0f});
    CHECK(sio::safetensors_file::open(p).read_as<float>("v") == std::vector<float>{1.0f});
  }
}

TEST_CASE("safetensors: expert_tensor_name") {
  CHECK(sio::expert_tensor_name(3, 5, "w1.weight") == "model.layers.3.mlp.experts.5.w1.weight");
  CHECK(sio::expert_tensor_name(0, 0, "down_proj.weight") == "model.layers.0.mlp.experts.0.down_proj.weight");
  CHECK_THROWS_WITH_AS(sio::expert_tensor_name(-1, 0, "w1"), doctest::Contains("layer = -1"), semoe::error);
  CHECK_THROWS_WITH_AS(sio::expert_tensor_name(0, -2, "w1"), doctest::Contains("expert = -2"), semoe::error);
  CHECK_THROWS_WITH_AS(sio::expert_tensor_name(0, 0, ""), doctest::Contains("part is empty"), semoe::error);
}

TEST_CASE("safetensors: dtype names and sizes") {
  CHECK(sio::dtype_name(sio::dtype::bf16) == "BF16");
  CHECK(sio::dtype_size(sio::dtype::f64) == 8);
  CHECK(sio::parse_dtype("F8_E4M3") == sio::dtype::f8_e4m3);
  CHECK(!sio::parse_dtype("f32").has_value());
  for (std::size_t i = 0; i < sio::detail::dtype_table.size(); ++i) {
    const auto t = static_cast<sio::dtype>(i);
    CHECK(sio::detail::dtype_table[i].type == t);
    CHECK(sio::parse_dtype(sio::dtype_name(t)) == t);
    if (i > 0) CHECK(sio::dtype_size(t) >= sio::dtype_size(static_cast<sio::dtype>(i - 1)));  // layout relies on it
  }
}

namespace {
/// A header of n one-byte U8 tensors "t0", "t1", ... tiling n bytes of data.
std::string many_tensors(std::size_t n) {
  std::string h = "{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i) h += ',';
    h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[" + std::to_string(i) +
         "," + std::to_string(i + 1) + "]}";
  }
  h += "}";
  return st_bytes(h, std::string(n, '\x05'));
}
}  // namespace

TEST_CASE("safetensors: a header of 50,000 tensors parses whole (the check pass and the DOM are linear)") {
  const auto bytes = many_tensors(50000);
  const auto f = sio::safetensors_file::parse(as_span(bytes));
  REQUIRE(f.tensors().size() == 50000);
  CHECK(f.tensors().front().name == "t0");  // by name
  std::uint64_t covered = 0;
  for (const auto& t : f.tensors()) covered += t.end - t.begin;
  CHECK(covered == 50000);
}

TEST_CASE("safetensors: tensor and key counts past the stated limits are refused") {
  check_refused(many_tensors(sio::detail::max_header_tensors + 1),
                {"more than " + std::to_string(sio::detail::max_header_tensors) + " tensors"});
  std::string meta = "{\"__metadata__\":{";
  for (std::size_t i = 0; i <= sio::detail::max_header_keys; ++i) meta += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":\"\"";
  meta += "}}";
  check_refused(st_bytes(meta, ""), {"\"__metadata__\"", "more than " + std::to_string(sio::detail::max_header_keys) + " keys"});
}
