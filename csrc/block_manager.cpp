// Block manager of the shared paged KV cache: which fixed-size KV blocks each sequence owns.
//
// One manager serves every policy of a MOD/SIPO decode: the N policies' KV pools have the same geometry
// and are indexed by the same block tables, so one allocation decision (and one copy-on-write pair) covers
// all N pools. The manager holds no tensors; it only hands out block ids and says which blocks to copy.
//
// Semantics (the Python model in tests/test_block_manager.py mirrors them):
//   * A sequence is a list of block ids (its block table) and a token count T; it owns ceil(T / B) blocks.
//   * fork() shares every block of a sequence with a new one (reference counts go up, nothing is copied).
//   * append_tokens(n) fills the last block and then takes fresh blocks. Appending into a *partially filled*
//     last block that another sequence also holds would overwrite that sequence's future slots, so the
//     appending sequence first takes a fresh block (copy-on-write) and returns (src, dst): the caller copies
//     the first T % B slots of src into dst in every pool before writing. A full shared block is never
//     written again, so it stays shared.
//   * Every operation checks everything first and then changes state, so an error (unknown sequence,
//     out of blocks, bad argument) leaves the manager exactly as it was.
//   * Optional prefix caching (add_prompt): each full prompt block is keyed by a chained hash of all tokens up
//     to its end; a later prompt with the same leading tokens shares those blocks. The block holding the
//     prompt's last token is never shared this way, so the caller always computes at least that token (its
//     logits start decoding) and never rewrites a shared block.
//
// Thread safety: every public method takes one internal mutex, so concurrent calls from several threads are
// safe (the GIL is kept: calls are short and the mutex makes them safe for C++ callers too).
#include "sipo_fast.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace sipo_fast {
namespace {

// Raised (as the Python exception sipo_fast._C.OutOfBlocksError, a RuntimeError) when an operation needs
// more free blocks than remain. State is unchanged when it is raised.
struct OutOfBlocks : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Sequence {
  std::vector<int64_t> blocks;
  int64_t num_tokens = 0;
  int64_t num_cached_tokens = 0;  // leading tokens found in the prefix cache when the sequence was added
};

// A full prompt block registered for prefix caching: its chain hash and the tokens it holds (compared on a
// hit, so a hash collision can never make two different prefixes share KV).
struct CachedBlock {
  uint64_t hash;
  std::vector<int64_t> prefix;  // all tokens from the prompt start to the end of this block
};

uint64_t mix(uint64_t h, uint64_t x) {
  // splitmix64-style mixing: cheap, well distributed; collisions are handled by comparing tokens anyway.
  h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return h;
}

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
      : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(enable_prefix_caching) {
    if (num_blocks <= 0 || block_size <= 0) {
      throw py::value_error("BlockManager(num_blocks=" + std::to_string(num_blocks) + ", block_size=" +
                            std::to_string(block_size) + "): both must be positive integers");
    }
    refcount_.assign(num_blocks, 0);
    free_.reserve(num_blocks);
    // Hand out low block ids first (pop from the back): easier to read in tests and debugging.
    for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
  }

  int64_t add_sequence(int64_t num_tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    check_count("add_sequence", "num_tokens", num_tokens);
    return new_sequence(num_tokens, "add_sequence(" + std::to_string(num_tokens) + ")");
  }

  int64_t add_prompt(const std::vector<int64_t>& tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (!prefix_caching_) return new_sequence(n, "add_prompt(" + std::to_string(n) + " tokens)");
    // Walk the full blocks that end before the last token; stop sharing at the first miss (a chain hash only
    // means something when every earlier block matched too).
    const int64_t shareable = n > 0 ? (n - 1) / block_size_ : 0;
    std::vector<int64_t> hits;
    std::vector<uint64_t> hashes;
    uint64_t h = 0x1234567ULL;
    bool matching = true;
    for (int64_t i = 0; i < shareable; ++i) {
      for (int64_t t = i * block_size_; t < (i + 1) * block_size_; ++t) h = mix(h, static_cast<uint64_t>(tokens[t]));
      hashes.push_back(h);
      if (matching) {
        auto it = hash_to_block_.find(h);
        if (it != hash_to_block_.end() && same_prefix(it->second, tokens, (i + 1) * block_size_)) {
          hits.push_back(it->second);
          continue;
        }
        matching = false;
      }
    }
    const int64_t need = blocks_for(n) - static_cast<int64_t>(hits.size());
    require_free(need, "add_prompt(" + std::to_string(n) + " tokens)");
    Sequence seq;
    seq.num_tokens = n;
    seq.num_cached_tokens = static_cast<int64_t>(hits.size()) * block_size_;
    for (int64_t b : hits) {
      refcount_[b] += 1;
      seq.blocks.push_back(b);
    }
    for (int64_t i = static_cast<int64_t>(hits.size()); i < blocks_for(n); ++i) {
      const int64_t b = take_block();
      seq.blocks.push_back(b);
      if (i < shareable && hash_to_block_.find(hashes[i]) == hash_to_block_.end()) {
        hash_to_block_[hashes[i]] = b;
        cached_[b] = CachedBlock{hashes[i],
                                 std::vector<int64_t>(tokens.begin(), tokens.begin() + (i + 1) * block_size_)};
      }
    }
    return insert(std::move(seq));
  }

  std::vector<std::pair<int64_t, int64_t>> append_tokens(int64_t seq_id, int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    Sequence& seq = find(seq_id);
    check_count("append_tokens", "n", n);
    require_free(append_need(seq, n), "append_tokens(seq " + std::to_string(seq_id) + ", " + std::to_string(n) + ")");
    std::vector<std::pair<int64_t, int64_t>> copies;
    append_unchecked(seq, n, &copies);
    return copies;
  }

  // All-or-nothing append for a decode step: either every sequence gets its tokens or none does.
  std::vector<std::pair<int64_t, int64_t>> append_tokens_batch(const std::vector<int64_t>& seq_ids,
                                                               const std::vector<int64_t>& counts) {
    std::lock_guard<std::mutex> lock(mu_);
    if (seq_ids.size() != counts.size()) {
      throw py::value_error("append_tokens_batch: seq_ids and counts must have the same length (got " +
                            std::to_string(seq_ids.size()) + " and " + std::to_string(counts.size()) + ")");
    }
    std::vector<Sequence*> seqs;
    std::unordered_map<int64_t, int> seen;
    int64_t need = 0;
    for (size_t i = 0; i < seq_ids.size(); ++i) {
      Sequence& seq = find(seq_ids[i]);
      check_count("append_tokens_batch", "counts[i]", counts[i]);
      if (seen[seq_ids[i]]++ > 0) {
        throw py::value_error("append_tokens_batch: sequence " + std::to_string(seq_ids[i]) +
                              " appears twice; pass each sequence once with its total count");
      }
      seqs.push_back(&seq);
      need += append_need(seq, counts[i]);
    }
    require_free(need, "append_tokens_batch(" + std::to_string(seq_ids.size()) + " sequences)");
    std::vector<std::pair<int64_t, int64_t>> copies;
    for (size_t i = 0; i < seqs.size(); ++i) append_unchecked(*seqs[i], counts[i], &copies);
    return copies;
  }

  int64_t fork(int64_t seq_id) {
    std::lock_guard<std::mutex> lock(mu_);
    Sequence child = find(seq_id);  // copy: same blocks, same token count
    for (int64_t b : child.blocks) refcount_[b] += 1;
    return insert(std::move(child));
  }

  void free(int64_t seq_id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) throw_unknown(seq_id);
    for (int64_t b : it->second.blocks) release_block(b);
    seqs_.erase(it);
  }

  std::vector<int64_t> block_table(int64_t seq_id) {
    std::lock_guard<std::mutex> lock(mu_);
    return find(seq_id).blocks;
  }

  // Block tables of several sequences as one int32 tensor [len(seq_ids), width], padded with block 0 (a valid
  // index, so a kernel that over-reads a padded slot stays in bounds; lengths say which slots are real).
  torch::Tensor block_tables(const std::vector<int64_t>& seq_ids, int64_t width) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<const Sequence*> seqs;
    int64_t longest = 0;
    for (int64_t id : seq_ids) {
      seqs.push_back(&find(id));
      longest = std::max<int64_t>(longest, static_cast<int64_t>(seqs.back()->blocks.size()));
    }
    if (width < 0) width = longest;
    if (width < longest) {
      throw py::value_error("block_tables: width=" + std::to_string(width) + " is smaller than the longest table (" +
                            std::to_string(longest) + " blocks); pass width=-1 or a larger width");
    }
    auto out = torch::zeros({static_cast<int64_t>(seqs.size()), width}, torch::dtype(torch::kInt32));
    auto acc = out.accessor<int32_t, 2>();
    for (size_t i = 0; i < seqs.size(); ++i) {
      for (size_t j = 0; j < seqs[i]->blocks.size(); ++j) acc[i][j] = static_cast<int32_t>(seqs[i]->blocks[j]);
    }
    return out;
  }

  int64_t num_tokens(int64_t seq_id) {
    std::lock_guard<std::mutex> lock(mu_);
    return find(seq_id).num_tokens;
  }

  int64_t num_cached_tokens(int64_t seq_id) {
    std::lock_guard<std::mutex> lock(mu_);
    return find(seq_id).num_cached_tokens;
  }

  int64_t num_free_blocks() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(free_.size());
  }

  int64_t refcount(int64_t block) {
    std::lock_guard<std::mutex> lock(mu_);
    if (block < 0 || block >= num_blocks_) {
      throw py::index_error("refcount: block " + std::to_string(block) + " is out of range [0, " +
                            std::to_string(num_blocks_) + ")");
    }
    return refcount_[block];
  }

  int64_t blocks_needed(int64_t seq_id, int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    Sequence& seq = find(seq_id);
    check_count("blocks_needed", "n", n);
    return append_need(seq, n);
  }

  std::vector<int64_t> seq_ids() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t> ids;
    for (const auto& kv : seqs_) ids.push_back(kv.first);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  int64_t num_cached_blocks() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(cached_.size());
  }

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }

 private:
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  // Fresh blocks that appending n tokens to seq needs: one for copy-on-write when the partial last block is
  // shared, plus the blocks the new tokens spill into.
  int64_t append_need(const Sequence& seq, int64_t n) const {
    if (n == 0) return 0;
    const bool partial = seq.num_tokens % block_size_ != 0;
    const bool cow = partial && refcount_[seq.blocks.back()] > 1;
    return (cow ? 1 : 0) + blocks_for(seq.num_tokens + n) - blocks_for(seq.num_tokens);
  }

  void append_unchecked(Sequence& seq, int64_t n, std::vector<std::pair<int64_t, int64_t>>* copies) {
    if (n == 0) return;
    if (seq.num_tokens % block_size_ != 0 && refcount_[seq.blocks.back()] > 1) {
      const int64_t src = seq.blocks.back();
      const int64_t dst = take_block();
      refcount_[src] -= 1;  // still > 0: another sequence holds it
      seq.blocks.back() = dst;
      copies->emplace_back(src, dst);
    }
    const int64_t extra = blocks_for(seq.num_tokens + n) - blocks_for(seq.num_tokens);
    for (int64_t i = 0; i < extra; ++i) seq.blocks.push_back(take_block());
    seq.num_tokens += n;
  }

  // A sequence of fresh blocks for num_tokens tokens (caller holds mu_); `what` names the call in the error.
  int64_t new_sequence(int64_t num_tokens, const std::string& what) {
    const int64_t need = blocks_for(num_tokens);
    require_free(need, what);
    Sequence seq;
    seq.num_tokens = num_tokens;
    for (int64_t i = 0; i < need; ++i) seq.blocks.push_back(take_block());
    return insert(std::move(seq));
  }

  bool same_prefix(int64_t block, const std::vector<int64_t>& tokens, int64_t end) const {
    const auto& prefix = cached_.at(block).prefix;
    return static_cast<int64_t>(prefix.size()) == end && std::equal(prefix.begin(), prefix.end(), tokens.begin());
  }

  int64_t take_block() {
    const int64_t b = free_.back();
    free_.pop_back();
    refcount_[b] = 1;
    return b;
  }

  void release_block(int64_t b) {
    if (--refcount_[b] == 0) {
      auto it = cached_.find(b);
      if (it != cached_.end()) {  // its KV is about to be overwritten: forget it in the prefix cache
        hash_to_block_.erase(it->second.hash);
        cached_.erase(it);
      }
      free_.push_back(b);
    }
  }

  void require_free(int64_t need, const std::string& what) const {
    if (need > static_cast<int64_t>(free_.size())) {
      throw OutOfBlocks(what + " needs " + std::to_string(need) + " free blocks but only " +
                        std::to_string(free_.size()) + " of " + std::to_string(num_blocks_) +
                        " are free; free finished sequences or build the manager with more blocks");
    }
  }

  static void check_count(const char* fn, const char* name, int64_t n) {
    if (n < 0) throw py::value_error(std::string(fn) + ": " + name + " must be >= 0, got " + std::to_string(n));
  }

  [[noreturn]] static void throw_unknown(int64_t seq_id) {
    throw py::key_error("unknown sequence id " + std::to_string(seq_id) + " (never added, or already freed)");
  }

  Sequence& find(int64_t seq_id) {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) throw_unknown(seq_id);
    return it->second;
  }

  int64_t insert(Sequence seq) {
    const int64_t id = next_id_++;
    seqs_.emplace(id, std::move(seq));
    return id;
  }

  const int64_t num_blocks_;
  const int64_t block_size_;
  const bool prefix_caching_;
  std::mutex mu_;
  std::vector<int64_t> free_;
  std::vector<int64_t> refcount_;
  std::unordered_map<int64_t, Sequence> seqs_;
  std::unordered_map<uint64_t, int64_t> hash_to_block_;
  std::unordered_map<int64_t, CachedBlock> cached_;
  int64_t next_id_ = 0;
};

}  // namespace

void init_block_manager(py::module_& m) {
  py::register_exception<OutOfBlocks>(m, "OutOfBlocksError", PyExc_RuntimeError);

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Block manager of the shared paged KV cache (C++; thread-safe: every method takes an internal mutex).

BlockManager(num_blocks, block_size, enable_prefix_caching=False)

A sequence holding T tokens owns ceil(T / block_size) blocks, listed in its block table. fork() shares all
blocks (reference counts up); append_tokens() copies-on-write a partially filled last block that another
sequence also holds and returns the (src, dst) pairs whose first T % block_size slots the caller copies in
every KV pool before writing. Errors leave the state unchanged: OutOfBlocksError (a RuntimeError) when too
few blocks are free, KeyError for an unknown sequence id, ValueError for negative counts.
With enable_prefix_caching, add_prompt(tokens) shares full prompt blocks with earlier prompts that start with
the same tokens (chained hash + token comparison); num_cached_tokens(seq) says how many leading tokens need
no prefill.)doc")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = false)
      .def("add_sequence", &BlockManager::add_sequence, py::arg("num_tokens"),
           "New sequence of num_tokens tokens (ceil(num_tokens / block_size) fresh blocks); returns its id.")
      .def("add_prompt", &BlockManager::add_prompt, py::arg("token_ids"),
           "New sequence holding token_ids; with prefix caching, reuses full blocks of earlier equal prefixes.")
      .def("append_tokens", &BlockManager::append_tokens, py::arg("seq_id"), py::arg("n"),
           "Grow a sequence by n tokens; returns the copy-on-write (src_block, dst_block) pairs to copy.")
      .def("append_tokens_batch", &BlockManager::append_tokens_batch, py::arg("seq_ids"), py::arg("counts"),
           "append_tokens for several sequences, all or nothing; returns all copy-on-write pairs.")
      .def("fork", &BlockManager::fork, py::arg("seq_id"), "New sequence sharing every block of seq_id.")
      .def("free", &BlockManager::free, py::arg("seq_id"), "Drop a sequence; blocks no one holds become free.")
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("block_tables", &BlockManager::block_tables, py::arg("seq_ids"), py::arg("width") = -1,
           "int32 tensor [len(seq_ids), width] of block tables, padded with 0; width=-1: the longest table.")
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("num_cached_tokens", &BlockManager::num_cached_tokens, py::arg("seq_id"),
           "Leading tokens whose KV came from the prefix cache when the sequence was added (0 without it).")
      .def("num_free_blocks", &BlockManager::num_free_blocks)
      .def("refcount", &BlockManager::refcount, py::arg("block"))
      .def("blocks_needed", &BlockManager::blocks_needed, py::arg("seq_id"), py::arg("n"),
           "Free blocks that append_tokens(seq_id, n) would take (copy-on-write included).")
      .def("seq_ids", &BlockManager::seq_ids, "Ids of the live sequences, sorted.")
      .def("num_cached_blocks", &BlockManager::num_cached_blocks, "Blocks registered in the prefix cache.")
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("prefix_caching", &BlockManager::prefix_caching);
}

}  // namespace sipo_fast
