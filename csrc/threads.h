// The shard builder's thread plumbing: a bounded FIFO between two threads and a small fork-join pool.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace solo {

// A bounded FIFO between two threads: push() blocks while it is full, pop() while it is empty and returns false once
// it is closed and drained. close(discard) ends it (discard: drop what is queued); a push after close is dropped.
template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}
  void push(T&& item) {
    std::unique_lock<std::mutex> lock(mu_);
    space_cv_.wait(lock, [&] { return items_.size() < capacity_ || closed_; });
    if (closed_) return;
    items_.push_back(std::move(item));
    cv_.notify_one();
  }
  bool pop(T& out) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return closed_ || !items_.empty(); });
    if (items_.empty()) return false;
    out = std::move(items_.front());
    items_.pop_front();
    space_cv_.notify_one();
    return true;
  }
  void close(bool discard) {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    if (discard) items_.clear();
    cv_.notify_all();
    space_cv_.notify_all();
  }

 private:
  const size_t capacity_;
  std::mutex mu_;
  std::condition_variable cv_, space_cv_;
  std::deque<T> items_;
  bool closed_ = false;
};

// A small fixed pool; parallel_for runs fn(0..n-1) on the pool plus the calling thread and waits.
class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // total threads incl. the caller; <= 1 means run inline
  ~ThreadPool();
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void worker();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, next_ = 0, finished_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace solo
