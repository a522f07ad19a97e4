// A small fixed-size std::thread pool for the embedding engine.
//
// Why not OpenMP: torch bundles its own libgomp, and a second OpenMP runtime loaded beside it
// has cost 3x elsewhere (NOTES.md). Why not torch's pool: the extension must not link libtorch.
// The pool is sized from Python with torch.get_num_threads() on every call.
//
// Fork safety: fork() copies only the calling thread. Without care a child forked while another
// thread is inside parallel_for inherits locked mutexes, condition variables with waiters that
// no longer exist, and thread handles of threads it does not have, and its first parallel_for
// hangs. pthread_atfork handlers (registered with the pool) make fork wait until no
// parallel_for is in flight (prepare takes both mutexes), release them in the parent, and give
// the child a fresh pool state (no workers; new mutexes and condition variables) whose workers
// start on the child's first parallel_for.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moefast {

class ThreadPool {
 public:
  // The process-wide pool (created on first use, joined at exit).
  static ThreadPool& instance();

  ~ThreadPool();

  // Run fn(task) for every task in [0, num_tasks) on up to num_threads threads (the caller is
  // one of them); returns when all tasks are done. Tasks are handed out dynamically, so uneven
  // tasks balance. The first exception a task throws is rethrown here after all tasks finish.
  // Calls from several host threads are serialised; fn must not call parallel_for itself.
  void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t)>& fn);

 private:
  ThreadPool();
  static void before_fork();
  static void after_fork_in_parent();
  static void after_fork_in_child();
  void ensure_workers(int count);
  void worker_loop(int worker_id);
  void run_tasks();

  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int active_workers_ = 0;  // workers 0 .. active_workers_ - 1 may join the current generation
  bool open_ = false;       // whether a worker that wakes now may still join
  int joined_ = 0;          // workers inside the current generation
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::exception_ptr error_;
  long owner_pid_ = 0;  // the process that started workers_ (a forked child starts its own)
};

}  // namespace moefast
