"""YAML from users (--config, --space, --set values), read in bounded time and memory.

yaml.safe_load builds no objects but the plain ones, yet it still lets an alias bomb (each level
repeating the anchor of the one below) stand for billions of values that any later walk (a
merge, a validation message) expands, and nests as deep as the text goes until Python's stack
runs out. Here the document's node graph is checked before anything is built from it.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000  # a whole run config is a few hundred; a sweep space a few thousand
MAX_DEPTH = 64


class TooLarge(yaml.YAMLError):
    """A document that would expand or nest beyond the bounds; str() says which."""


def load(text: str) -> Any:
    """yaml.safe_load, refusing (TooLarge) documents beyond MAX_VALUES or MAX_DEPTH."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the composer recurses once per level
            raise TooLarge(f"nested more than {MAX_DEPTH} levels deep") from None
        if node is None:
            return None
        _check_bounds(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_bounds(root: yaml.Node) -> None:
    """Values counted as expanded and depth, walking each shared node once (aliases share nodes)."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) below and including it
    path: set[int] = set()  # the nodes being walked: meeting one again is an alias to itself
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in done:
            continue
        children = _children(node)
        if not children_done:
            if id(node) in path:
                raise TooLarge("an alias refers to a node that contains it")
            path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in done)
            continue
        path.discard(id(node))
        values = 1 + sum(done[id(c)][0] for c in children)
        depth = 1 + max((done[id(c)][1] for c in children), default=0)
        if values > MAX_VALUES:
            raise TooLarge(f"expands to more than {MAX_VALUES} values (aliases repeating aliases?)")
        if depth > MAX_DEPTH:
            raise TooLarge(f"nested more than {MAX_DEPTH} levels deep")
        done[id(node)] = (values, depth)
