// semoe-run: start P ranks of a program (see semoe/launch/launcher.hpp).
//   semoe-run -n 2 ./fortune_lm --steps 1000
//   semoe-run -n 4 --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 ./train   (on each host)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "semoe/launch/launcher.hpp"

int main(int argc, char** argv) {
  semoe::launch::options o;
  std::vector<std::string> prog;
  auto usage = [&](const char* why) {
    std::fprintf(stderr,
                 "%s\nusage: semoe-run -n P [--nnodes N --node-rank R --master ADDR:PORT] [--no-prefix] program "
                 "[args...]\n",
                 why);
    std::exit(2);
  };
  int i = 1;
  try {
    for (; i < argc && argv[i][0] == '-'; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) usage(("missing value after " + a).c_str());
        return argv[++i];
      };
      if (a == "-n") o.ranks_per_node = std::stoi(value());
      else if (a == "--nnodes") o.nnodes = std::stoi(value());
      else if (a == "--node-rank") o.node_rank = std::stoi(value());
      else if (a == "--master") {
        const std::string m = value();
        const auto colon = m.rfind(':');
        if (colon == std::string::npos) usage("--master wants ADDR:PORT");
        o.master_addr = m.substr(0, colon);
        o.master_port = std::stoi(m.substr(colon + 1));
      } else if (a == "--no-prefix") o.prefix = false;
      else if (a == "--help" || a == "-h") usage("Start P ranks of a semoe program.");
      else if (a == "--") { ++i; break; }
      else usage(("unknown option " + a).c_str());
    }
  } catch (const std::logic_error&) {
    usage("bad number in the options");
  }
  for (; i < argc; ++i) prog.emplace_back(argv[i]);
  if (prog.empty()) usage("no program given");
  try {
    return semoe::launch::run(prog, o).exit_code;
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
