// semoe-run: start P ranks of a program (see semoe/launch/launcher.hpp).
//   semoe-run -n 2 ./fortune_lm --steps 1000
//   semoe-run -n 4 --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 ./train   (on each host)
//   semoe-run -n 4 --elastic --min-ranks 3 ./elastic_train --checkpoints ckpt   (a lost rank: go on with 3)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "semoe/launch/launcher.hpp"

int main(int argc, char** argv) {
  semoe::launch::options o;
  std::vector<std::string> prog;
  bool elastic = false;
  auto usage = [&](const char* why, bool asked = false) {
    std::fprintf(asked ? stdout : stderr,
                 "%s\nusage: semoe-run -n P [--nnodes N --node-rank R --master ADDR:PORT] [--no-prefix]\n"
                 "                 [--elastic [--min-ranks M]] program [args...]\n"
                 "Each rank gets SEMOE_RANK, SEMOE_WORLD_SIZE, SEMOE_LOCAL_RANK, SEMOE_LOCAL_SIZE,\n"
                 "SEMOE_MASTER_ADDR, SEMOE_MASTER_PORT, SEMOE_SECRET and SEMOE_RESTART_COUNT.\n"
                 "--elastic: when a rank fails, start the job again on the ranks that remain (one host;\n"
                 "at least M of them, default 1); the program resumes from its last checkpoint.\n",
                 why);
    std::exit(asked ? 0 : 2);
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
      else if (a == "--elastic") elastic = true;
      else if (a == "--min-ranks") o.min_ranks = std::stoi(value());
      else if (a == "--help" || a == "-h") usage("Start P ranks of a semoe program.", true);
      else if (a == "--") { ++i; break; }
      else usage(("unknown option " + a).c_str());
    }
  } catch (const std::logic_error&) {
    usage("bad number in the options");
  }
  for (; i < argc; ++i) prog.emplace_back(argv[i]);
  if (prog.empty()) usage("no program given");
  try {
    if (o.min_ranks != 1 && !elastic) usage("--min-ranks needs --elastic");
    return (elastic ? semoe::launch::run_elastic(prog, o) : semoe::launch::run(prog, o)).exit_code;
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
