#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <new>

#include <pthread.h>
#include <unistd.h>

namespace moefast {

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::ThreadPool() : owner_pid_(static_cast<long>(getpid())) {
  // Registered once, with the pool (a function-local static: constructed on first use).
  pthread_atfork(&ThreadPool::before_fork, &ThreadPool::after_fork_in_parent,
                 &ThreadPool::after_fork_in_child);
}

// fork() waits here until no parallel_for is in flight (call_mutex_), and until no worker is
// between wake-ups (mutex_); the workers then all sleep in wake_.wait, owning nothing.
void ThreadPool::before_fork() {
  ThreadPool& pool = instance();
  pool.call_mutex_.lock();
  pool.mutex_.lock();
}

void ThreadPool::after_fork_in_parent() {
  ThreadPool& pool = instance();
  pool.mutex_.unlock();
  pool.call_mutex_.unlock();
}

// The child has only the forking thread. The parent's workers do not exist here: leak their
// handles (destroying a joinable std::thread aborts), and replace the condition variables,
// whose internal state still counts the parent's sleeping workers as waiters (glibc's
// condition variable can then block a later notify forever). Storage reuse without running
// the destructors is deliberate: those objects' state belongs to threads that are gone.
void ThreadPool::after_fork_in_child() {
  ThreadPool& pool = instance();
  if (!pool.workers_.empty()) new std::vector<std::thread>(std::move(pool.workers_));
  pool.workers_.clear();
  new (&pool.wake_) std::condition_variable();
  new (&pool.done_) std::condition_variable();
  pool.stop_ = false;
  pool.active_workers_ = 0;
  pool.open_ = false;
  pool.joined_ = 0;
  pool.fn_ = nullptr;
  pool.num_tasks_ = 0;
  pool.error_ = nullptr;
  pool.owner_pid_ = static_cast<long>(getpid());
  pool.mutex_.unlock();
  pool.call_mutex_.unlock();
}

ThreadPool::~ThreadPool() {
  if (static_cast<long>(getpid()) != owner_pid_) {  // forked child: the threads are not ours
    if (!workers_.empty()) new std::vector<std::thread>(std::move(workers_));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int count) {
  // Called under call_mutex_ only, with no generation in flight. (A forked child starts with no
  // workers: after_fork_in_child.)
  while (static_cast<int>(workers_.size()) < count) {
    const int id = static_cast<int>(workers_.size());
    workers_.emplace_back([this, id] { worker_loop(id); });
  }
}

void ThreadPool::run_tasks() {
  for (;;) {
    const int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (task >= num_tasks_) return;
    try {
      (*fn_)(task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop(int worker_id) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && worker_id < active_workers_); });
      if (stop_) return;
      seen = generation_;
      // A worker that wakes after the caller has taken every task stays out: the caller never
      // waits for a sleeping thread to be scheduled (on a loaded machine that costs a time slice).
      if (!open_) continue;
      ++joined_;
    }
    run_tasks();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --joined_;
    }
    done_.notify_one();
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, int num_threads,
                              const std::function<void(int64_t)>& fn) {
  if (num_tasks <= 0) return;
  const int helpers = static_cast<int>(
      std::min<int64_t>(std::max(num_threads, 1) - 1, num_tasks - 1));
  if (helpers == 0) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  ensure_workers(helpers);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    active_workers_ = helpers;
    open_ = true;
    joined_ = 0;
    ++generation_;
  }
  wake_.notify_all();
  run_tasks();  // returns once every task has been handed out
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;
    // Tasks still running belong to joined workers: wait for them only.
    done_.wait(lock, [&] { return joined_ == 0; });
    active_workers_ = 0;
    fn_ = nullptr;
    error = error_;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace moefast
