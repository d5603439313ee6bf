"""The prefix cache: keys/values of earlier sequences, reused by later ones that start with the same tokens.

A tree of blocks. A node holds the keys/values of up to `block` consecutive positions and stands for the whole
token prefix from the root to its end, so two prefixes that differ anywhere never share a node. A lookup walks
the prompt block by block (a dict lookup per full block) and ends, at the first block that does not match
whole, with the longest common prefix among that node's children: reuse is exact to the token, not rounded
down to a block. What is stored: every whole block of a finished (or fully read) sequence, and its last,
partial block as a shorter node.
The roots: causal models (ChatGLM2/3, GLM-4) have one root and blocks from position 0. ChatGLM-6B (prefix LM)
has a root per tag (its context length and mask position), under which the first node is the whole
bidirectional context (every position of it depends on all of it, so it is reused whole or not at all), then
blocks.

Memory: each node holds a copy [layers, 2, G, n, D] of its positions (engine/cache.py's read()); the total
stays within `budget_bytes`, evicting the least recently used node that no other node extends (a leaf), so
what is left is always a set of whole prefixes. A budget of 0 turns the cache off. Only the engine's thread
uses it.
"""
from __future__ import annotations

import collections
import itertools
from typing import Callable, Optional, Sequence

import torch


class _Node:
    __slots__ = ("id", "tokens", "parent", "kids", "kv", "start", "stop")

    def __init__(self, nid: int, tokens: tuple, parent: Optional["_Node"], kv, start: int):
        self.id, self.tokens, self.parent, self.kv = nid, tokens, parent, kv
        self.start, self.stop = start, start + len(tokens)
        self.kids: dict = {}                               # tokens -> child node

    def kv_of(self, a: int, b: int) -> torch.Tensor:
        """Keys/values of positions [a, b) (inside this node)."""
        return self.kv[:, :, :, a - self.start:b - self.start]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, budget_bytes: int, bytes_per_token: int, block: int = 16):
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.budget, self.bytes_per_token, self.block = max(0, int(budget_bytes)), bytes_per_token, block
        self.roots: dict = {}                                  # tag -> root (no positions)
        self.lru: collections.OrderedDict = collections.OrderedDict()   # node id -> node, oldest first
        self.bytes = 0
        self.evictions = 0
        self._ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self.lru)

    def clear(self):
        self.roots.clear()
        self.lru.clear()
        self.bytes = 0

    def _units(self, n: int, head: Optional[int]):
        """(start, stop) of the units over n positions: the head unit (a prefix LM's context) whole, then blocks;
        the last may be partial."""
        a = 0
        if head:
            if n < head:
                return
            yield 0, head
            a = head
        while a < n:
            yield a, min(a + self.block, n)
            a += self.block

    def match(self, ids: Sequence[int], head: Optional[int] = None, tag=None) -> tuple[list, int]:
        """-> (nodes, n): the first n positions of ids are cached, in these nodes (the last one possibly only in
        part). Touches them as recently used."""
        node = self.roots.get(tag) if self.enabled else None
        chain, n = [], 0
        for a, b in self._units(len(ids), head):
            if node is None:
                break
            nxt = node.kids.get(tuple(ids[a:b]))
            if nxt is not None:
                chain.append(nxt)
                node, n = nxt, b
                continue
            if head and a == 0:                                # a context is reused whole or not at all
                break
            best, best_len = None, 0
            for kid in node.kids.values():
                k = _common(kid.tokens, ids[a:b])
                if k > best_len:
                    best, best_len = kid, k
            if best is not None:
                chain.append(best)
                n = a + best_len
            break
        for nd in reversed(chain):
            self.lru.move_to_end(nd.id)
        return chain, n

    def insert(self, ids: Sequence[int], n: int, read: Callable[[int, int], torch.Tensor],
               head: Optional[int] = None, tag=None) -> int:
        """Store the units of the first n positions of ids that are not stored yet; read(a, b) gives the
        keys/values of positions [a, b). -> number of nodes added."""
        if not self.enabled:
            return 0
        node = self.roots.get(tag)
        if node is None:
            node = self.roots[tag] = _Node(0, (), None, None, 0)
        added, chain = 0, set()
        for a, b in self._units(n, head):
            tokens = tuple(ids[a:b])
            nxt = node.kids.get(tokens)
            if nxt is None:
                need = (b - a) * self.bytes_per_token
                if need > self.budget or not self._make_room(need, protect=chain | {node.id}):
                    break
                nxt = _Node(next(self._ids), tokens, node, read(a, b), a)
                self._drop_shorter_siblings(nxt)
                node.kids[tokens] = nxt
                self.lru[nxt.id] = nxt
                self.bytes += need
                added += 1
            else:
                self.lru.move_to_end(nxt.id)
            chain.add(nxt.id)
            node = nxt
        return added

    def _drop_shorter_siblings(self, new: _Node):
        """A partial block that the new node extends is redundant (when nothing hangs below it)."""
        for tokens, kid in list(new.parent.kids.items()):
            if len(tokens) < len(new.tokens) and not kid.kids and new.tokens[:len(tokens)] == tokens:
                self._drop(kid, evicted=False)

    def _make_room(self, need: int, protect: set) -> bool:
        while self.bytes + need > self.budget:
            victim = next((nd for nd in self.lru.values() if not nd.kids and nd.id not in protect), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _drop(self, node: _Node, evicted: bool = True):
        del node.parent.kids[node.tokens]
        del self.lru[node.id]
        self.bytes -= (node.stop - node.start) * self.bytes_per_token
        self.evictions += evicted
