"""BlockManager (C++) against a Python model of the same semantics, with invariants after every step.

The model keeps its own free set, reference counts, tables and prefix cache. It does not predict *which* free
block the manager picks, only that the pick was free; everything else (table shapes, sharing, copy-on-write
pairs, errors, token counts, prefix-cache hits) it predicts exactly.
"""
import random
import threading

import pytest

from sipo_fast.kv import BlockManager, OutOfBlocksError


def ceil_div(a, b):
    return -(-a // b)


class ModelManager:
    """Plain-Python statement of the semantics in csrc/block_manager.cpp."""

    def __init__(self, num_blocks, block_size, prefix_caching=False):
        self.num_blocks, self.bs, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = set(range(num_blocks))
        self.ref = [0] * num_blocks
        self.tables, self.ntok = {}, {}
        self.cache = {}  # tuple(prefix tokens) -> block
        self.block_key = {}  # block -> its prefix key

    def take(self, block):
        assert block in self.free, f"manager handed out block {block}, which is not free"
        self.free.remove(block)
        self.ref[block] = 1

    def release(self, block):
        self.ref[block] -= 1
        assert self.ref[block] >= 0
        if self.ref[block] == 0:
            self.free.add(block)
            key = self.block_key.pop(block, None)
            if key is not None:
                del self.cache[key]

    def append_need(self, sid, n):
        if n == 0:
            return 0, False
        t = self.ntok[sid]
        cow = t % self.bs != 0 and self.ref[self.tables[sid][-1]] > 1
        return int(cow) + ceil_div(t + n, self.bs) - ceil_div(t, self.bs), cow

    def prompt_hits(self, tokens):
        n = len(tokens)
        shareable = (n - 1) // self.bs if n else 0
        hits = []
        if self.prefix_caching:
            for i in range(shareable):
                block = self.cache.get(tuple(tokens[: (i + 1) * self.bs]))
                if block is None:
                    break
                hits.append(block)
        return hits, shareable


class Harness:
    """Runs one operation on both, compares results, checks invariants."""

    def __init__(self, num_blocks, block_size, prefix_caching=False):
        self.real = BlockManager(num_blocks, block_size, prefix_caching)
        self.model = ModelManager(num_blocks, block_size, prefix_caching)

    def snapshot(self):
        r = self.real
        return (r.num_free_blocks(), r.seq_ids(), {s: (r.block_table(s), r.num_tokens(s)) for s in r.seq_ids()},
                [r.refcount(b) for b in range(r.num_blocks)], r.num_cached_blocks())

    def check_invariants(self):
        r, m = self.real, self.model
        assert r.seq_ids() == sorted(m.tables)
        holders = [0] * r.num_blocks
        for sid in r.seq_ids():
            table = r.block_table(sid)
            assert table == m.tables[sid]
            assert r.num_tokens(sid) == m.ntok[sid]
            assert len(table) == ceil_div(m.ntok[sid], m.bs), "table length must be ceil(tokens / block_size)"
            assert len(set(table)) == len(table), "a block appears twice in one table"
            for b in table:
                holders[b] += 1
        refs = [r.refcount(b) for b in range(r.num_blocks)]
        assert refs == holders, "each block's refcount must equal the number of tables holding it"
        assert refs == m.ref
        free = r.num_free_blocks()
        assert free == len(m.free) == sum(1 for c in refs if c == 0), "no leaked or double-freed block"
        used = sum(1 for c in refs if c > 0)
        assert used + free == r.num_blocks
        assert r.num_cached_blocks() == len(m.cache)
        assert all(refs[b] > 0 for b in m.cache.values()), "a freed block stayed in the prefix cache"

    def add(self, n):
        m = self.model
        need = ceil_div(n, m.bs)
        if need > len(m.free):
            before = self.snapshot()
            with pytest.raises(OutOfBlocksError):
                self.real.add_sequence(n)
            assert self.snapshot() == before
            return None
        sid = self.real.add_sequence(n)
        table = self.real.block_table(sid)
        assert len(table) == need
        for b in table:
            m.take(b)
        m.tables[sid], m.ntok[sid] = table, n
        return sid

    def add_prompt(self, tokens):
        m = self.model
        hits, shareable = m.prompt_hits(tokens)
        need = ceil_div(len(tokens), m.bs) - len(hits)
        if need > len(m.free):
            before = self.snapshot()
            with pytest.raises(OutOfBlocksError):
                self.real.add_prompt(tokens)
            assert self.snapshot() == before
            return None
        sid = self.real.add_prompt(tokens)
        table = self.real.block_table(sid)
        assert table[: len(hits)] == hits, "prefix-cache hits must reuse the cached blocks"
        assert self.real.num_cached_tokens(sid) == len(hits) * m.bs
        for b in hits:
            m.ref[b] += 1
        for i, b in enumerate(table[len(hits):], start=len(hits)):
            m.take(b)
            key = tuple(tokens[: (i + 1) * m.bs])
            if m.prefix_caching and i < shareable and key not in m.cache:
                m.cache[key], m.block_key[b] = b, key
        m.tables[sid], m.ntok[sid] = table, len(tokens)
        return sid

    def append(self, sid, n):
        m = self.model
        need, cow = m.append_need(sid, n)
        assert self.real.blocks_needed(sid, n) == need
        if need > len(m.free):
            before = self.snapshot()
            with pytest.raises(OutOfBlocksError):
                self.real.append_tokens(sid, n)
            assert self.snapshot() == before
            return
        old = list(m.tables[sid])
        pairs = self.real.append_tokens(sid, n)
        table = self.real.block_table(sid)
        assert len(pairs) == int(cow)
        if cow:
            src, dst = pairs[0]
            assert src == old[-1] and table[len(old) - 1] == dst
            m.ref[src] -= 1
            m.take(dst)
            old[-1] = dst
        assert table[: len(old)] == old, "append must not move existing blocks"
        for b in table[len(old):]:
            m.take(b)
        m.tables[sid], m.ntok[sid] = table, m.ntok[sid] + n

    def fork(self, sid):
        child = self.real.fork(sid)
        m = self.model
        m.tables[child], m.ntok[child] = list(m.tables[sid]), m.ntok[sid]
        for b in m.tables[sid]:
            m.ref[b] += 1
        return child

    def free(self, sid):
        self.real.free(sid)
        for b in self.model.tables.pop(sid):
            self.model.release(b)
        del self.model.ntok[sid]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size,num_blocks,prefix_caching", [(1, 7, False), (3, 16, False), (4, 9, True),
                                                                   (2, 24, True)])
def test_random_operations_match_model(seed, block_size, num_blocks, prefix_caching):
    rng = random.Random(seed * 101 + block_size)
    h = Harness(num_blocks, block_size, prefix_caching)
    live = []
    for _ in range(300):
        op = rng.random()
        if op < 0.15 or not live:
            if prefix_caching and rng.random() < 0.7:
                # Tiny vocabulary so different prompts often share leading blocks.
                sid = h.add_prompt([rng.randrange(2) for _ in range(rng.randrange(0, 4 * block_size + 2))])
            else:
                sid = h.add(rng.randrange(0, 3 * block_size + 2))
            if sid is not None:
                live.append(sid)
        elif op < 0.5:
            h.append(rng.choice(live), rng.choice([0, 1, 1, 1, block_size - 1, block_size, 2 * block_size + 1]))
        elif op < 0.7:
            live.append(h.fork(rng.choice(live)))
        elif op < 0.9:
            sid = live.pop(rng.randrange(len(live)))
            h.free(sid)
        else:  # unknown or already-freed ids must raise and change nothing
            before = h.snapshot()
            bad = rng.choice([-1, 10**9, *(s for s in range(max(live) + 1) if s not in live)])
            with pytest.raises(KeyError):
                rng.choice([h.real.free, h.real.fork, h.real.block_table, h.real.num_tokens])(bad)
            with pytest.raises(KeyError):
                h.real.append_tokens(bad, 1)
            assert h.snapshot() == before
        h.check_invariants()
    for sid in live:
        h.free(sid)
    h.check_invariants()
    assert h.real.num_free_blocks() == num_blocks


def test_copy_on_write_of_partial_shared_block():
    """Prompt of 5 tokens, block 4: blocks [a, b] with b half full. Two forks append: each takes a fresh copy
    of b (pair (b, fresh)); the prompt's full block a stays shared by all three."""
    bm = BlockManager(8, 4)
    p = bm.add_sequence(5)
    a, b = bm.block_table(p)
    s1, s2 = bm.fork(p), bm.fork(p)
    assert bm.refcount(a) == 3 and bm.refcount(b) == 3
    (src, dst), = bm.append_tokens(s1, 1)
    assert src == b and dst not in (a, b) and bm.block_table(s1) == [a, dst]
    assert bm.refcount(b) == 2 and bm.refcount(dst) == 1
    assert bm.append_tokens(s1, 1) == [], "the copy is private now: no second copy"
    bm.free(p)
    assert bm.append_tokens(s2, 1) == [], "b is held by s2 alone after p is freed: write in place"
    assert bm.block_table(s2) == [a, b]


def test_full_shared_block_is_not_copied():
    bm = BlockManager(4, 2)
    p = bm.add_sequence(2)
    s = bm.fork(p)
    assert bm.append_tokens(s, 1) == []
    assert bm.block_table(s)[0] == bm.block_table(p)[0] and len(bm.block_table(s)) == 2


def test_batch_append_is_all_or_nothing():
    bm = BlockManager(3, 2)
    a, b = bm.add_sequence(2), bm.add_sequence(1)
    free = bm.num_free_blocks()
    with pytest.raises(OutOfBlocksError):
        bm.append_tokens_batch([a, b], [1, 4])  # a needs 1 block, b needs 2; only 1 free
    assert bm.num_free_blocks() == free and bm.num_tokens(a) == 2 and bm.num_tokens(b) == 1
    with pytest.raises(ValueError, match="twice"):
        bm.append_tokens_batch([a, a], [1, 1])
    with pytest.raises(KeyError):
        bm.append_tokens_batch([a, 77], [1, 1])
    with pytest.raises(ValueError):
        bm.append_tokens_batch([a], [1, 1])
    assert bm.num_tokens(a) == 2
    assert bm.append_tokens_batch([a, b], [1, 1]) == []
    assert (bm.num_tokens(a), bm.num_tokens(b), bm.num_free_blocks()) == (3, 2, 0)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, -1)
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError):
        bm.add_sequence(-3)
    s = bm.add_sequence(1)
    with pytest.raises(ValueError):
        bm.append_tokens(s, -1)
    with pytest.raises(IndexError):
        bm.refcount(4)
    with pytest.raises(IndexError):
        bm.refcount(-1)
    with pytest.raises(TypeError):
        bm.add_sequence("3")
    assert bm.num_free_blocks() == 3 and bm.seq_ids() == [s]


def test_block_tables_tensor():
    bm = BlockManager(10, 2)
    a, b = bm.add_sequence(5), bm.add_sequence(1)
    t = bm.block_tables([b, a])
    assert t.dtype.is_signed and t.shape == (2, 3)
    assert t[0, :1].tolist() == bm.block_table(b) and t[1].tolist() == bm.block_table(a)
    assert bm.block_tables([a], width=5).shape == (1, 5)
    with pytest.raises(ValueError, match="width"):
        bm.block_tables([a], width=2)


def test_prefix_caching_shares_blocks_and_forgets_freed_ones():
    """Block 2: prompts [1,2,3,4,5] and [1,2,3,4,9] share blocks (1,2) and (3,4); the last-token block never.
    A prompt that ends exactly at a block boundary does not share its last block (its last token must be
    computed to get logits)."""
    bm = BlockManager(16, 2, enable_prefix_caching=True)
    a = bm.add_prompt([1, 2, 3, 4, 5])
    b = bm.add_prompt([1, 2, 3, 4, 9])
    assert bm.block_table(a)[:2] == bm.block_table(b)[:2] and bm.block_table(a)[2] != bm.block_table(b)[2]
    assert bm.num_cached_tokens(a) == 0 and bm.num_cached_tokens(b) == 4
    c = bm.add_prompt([1, 2, 3, 4])
    assert bm.num_cached_tokens(c) == 2 and bm.block_table(c)[0] == bm.block_table(a)[0]
    assert bm.block_table(c)[1] != bm.block_table(a)[1]
    d = bm.add_prompt([1, 7, 3, 4, 5])
    assert bm.num_cached_tokens(d) == 0, "a chain hash only matches when every earlier block matched"
    for s in (a, b, c, d):
        bm.free(s)
    assert bm.num_cached_blocks() == 0 and bm.num_free_blocks() == 16
    e = bm.add_prompt([1, 2, 3, 4, 5])
    assert bm.num_cached_tokens(e) == 0, "freed blocks must not be served from the cache"
    plain = BlockManager(4, 2)
    s = plain.add_prompt([1, 2, 3])
    assert plain.num_cached_tokens(plain.add_prompt([1, 2, 3])) == 0 and plain.num_tokens(s) == 3


def test_concurrent_fork_free_keeps_invariants():
    """Thread safety: 4 threads fork/append/free on shared prompts; afterwards every block is accounted for."""
    bm = BlockManager(4096, 4)
    prompts = [bm.add_sequence(7) for _ in range(4)]
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                s = bm.fork(rng.choice(prompts))
                bm.append_tokens(s, rng.randrange(1, 6))
                bm.free(s)
        except Exception as exc:  # surfaced below; a crash would kill the process instead
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert bm.num_free_blocks() == 4096 - 8
    assert all(bm.refcount(b) == 1 for p in prompts for b in bm.block_table(p))
