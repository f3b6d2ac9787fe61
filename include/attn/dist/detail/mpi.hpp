// attn/dist/detail/mpi.hpp - what attn/dist needs from MPI: a communicator of its own, errors every
// rank agrees on, and messages of any size.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn/error.hpp"

namespace attn::dist::detail {

// A duplicate of the caller's communicator (MPI_Comm_dup, collective), so attn's messages never
// match the caller's; freed with the last copy, unless MPI is already finalized.
class Comm {
 public:
  explicit Comm(MPI_Comm comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) throw argument_error("attn::dist: MPI is not initialized (call MPI_Init first)");
    auto* dup = new MPI_Comm;
    MPI_Comm_dup(comm, dup);
    comm_.reset(dup, [](MPI_Comm* c) {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Comm_free(c);
      delete c;
    });
    MPI_Comm_rank(*comm_, &rank_);
    MPI_Comm_size(*comm_, &size_);
  }
  MPI_Comm get() const { return *comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  std::shared_ptr<MPI_Comm> comm_;
  int rank_ = 0, size_ = 1;
};

// An error found on one rank, carried to all: its kind (which attn exception) and message.
struct RankError {
  int kind = 0;  // 0: none; 1: shape_error; 2: argument_error; 3: format_error; 4: anything else
  std::string message;
};

[[noreturn]] inline void throw_error(int kind, const std::string& message) {
  switch (kind) {
    case 1:
      throw shape_error(message);
    case 2:
      throw argument_error(message);
    case 3:
      throw format_error(message);
    default:
      throw std::runtime_error(message);
  }
}

// Runs f() on this rank and makes every rank agree: if f threw on any rank, every rank throws the
// same error - the lowest failing rank's kind and message, with that rank named - instead of some
// ranks waiting forever for messages the failed ones will never send. Collective.
template <class F>
void agree(MPI_Comm comm, F&& f) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  RankError e;
  try {
    f();
  } catch (const shape_error& x) {
    e = {1, x.what()};
  } catch (const argument_error& x) {
    e = {2, x.what()};
  } catch (const format_error& x) {
    e = {3, x.what()};
  } catch (const std::exception& x) {
    e = {4, x.what()};
  }
  int first = e.kind ? rank : INT_MAX;
  MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == INT_MAX) return;
  int header[2] = {e.kind, int(e.message.size())};
  MPI_Bcast(header, 2, MPI_INT, first, comm);
  e.message.resize(std::size_t(header[1]));
  MPI_Bcast(e.message.data(), header[1], MPI_CHAR, first, comm);
  throw_error(header[0], e.message + " [on rank " + std::to_string(first) + " of " + std::to_string(size) +
                             "; every rank throws this error]");
}

// Non-blocking send and receive of `bytes` bytes, as pieces of at most 1 GiB (MPI counts are int).
inline void post_send(const Comm& c, const unsigned char* buf, std::size_t bytes, int to,
                      std::vector<MPI_Request>& reqs) {
  constexpr std::size_t kPiece = std::size_t(1) << 30;
  int tag = 0;
  for (std::size_t at = 0; at < bytes; at += kPiece, ++tag) {
    reqs.emplace_back();
    MPI_Isend(buf + at, int(std::min(kPiece, bytes - at)), MPI_BYTE, to, tag, c.get(), &reqs.back());
  }
}
inline void post_recv(const Comm& c, unsigned char* buf, std::size_t bytes, int from, std::vector<MPI_Request>& reqs) {
  constexpr std::size_t kPiece = std::size_t(1) << 30;
  int tag = 0;
  for (std::size_t at = 0; at < bytes; at += kPiece, ++tag) {
    reqs.emplace_back();
    MPI_Irecv(buf + at, int(std::min(kPiece, bytes - at)), MPI_BYTE, from, tag, c.get(), &reqs.back());
  }
}

}  // namespace attn::dist::detail
