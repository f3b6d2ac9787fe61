// bench/peak_rss.hpp - the peak resident memory of a piece of work, measured in a child process:
// fork(), the child runs the work and _exits, the parent reads the child's ru_maxrss from wait4().
// The child starts with this process's resident pages (copy-on-write; fork_base_mib), which its
// peak includes. Linux and macOS.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace attn_bench {

struct Peak {
  double peak_mib = -1;       // the child's ru_maxrss
  double fork_base_mib = -1;  // this process's resident memory when it forked
  std::string error;          // empty: measured
};

inline double mib(double bytes) { return bytes / double(1 << 20); }

// This process's resident memory now, in MiB (/proc/self/statm); -1 where unreadable.
inline double resident_mib() {
  std::ifstream statm("/proc/self/statm");
  double pages = -1, resident = -1;
  if (!(statm >> pages >> resident)) return -1;
  return mib(resident * double(sysconf(_SC_PAGESIZE)));
}

// Runs work() in a child process: it returns the child's exit code (0: success); an exception is a
// failure, reported on stderr with `what`.
template <class Work>
Peak peak_rss(const std::string& what, const Work& work) {
  Peak p;
#if defined(__GLIBC__)
  malloc_trim(0);  // freed heap memory back to the kernel: not in the child's RSS
#endif
  p.fork_base_mib = resident_mib();
  std::fflush(nullptr);  // nothing buffered for the child to write twice
  const pid_t pid = fork();
  if (pid < 0) {
    p.error = std::string("fork: ") + std::strerror(errno);
    return p;
  }
  if (pid == 0) {  // the child: _exit, no static destructors
    int code = 1;
    try {
      code = work();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "peak-RSS child (%s): %s\n", what.c_str(), e.what());
    } catch (...) {
    }
    std::fflush(nullptr);
    _exit(code);
  }
  int status = 0;
  struct rusage usage {};
  if (wait4(pid, &status, 0, &usage) != pid) {
    p.error = std::string("wait4: ") + std::strerror(errno);
    return p;
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    p.error = "the peak-RSS child failed (" +
              (WIFEXITED(status) ? "exit code " + std::to_string(WEXITSTATUS(status))
                                 : "signal " + std::to_string(WIFSIGNALED(status) ? WTERMSIG(status) : 0)) +
              ")";
    return p;
  }
#if defined(__APPLE__)
  p.peak_mib = mib(double(usage.ru_maxrss));  // bytes
#else
  p.peak_mib = double(usage.ru_maxrss) / 1024.0;  // KiB
#endif
  return p;
}

}  // namespace attn_bench
