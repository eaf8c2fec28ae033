"""Bytes on the wire per event, and permessage-deflate (``--deflate``), per run and per report.

The C load client counts every WebSocket frame it receives after the upgrade, header and payload
as received (compressed or not), and the data messages' payloads after inflating; the Python
clients count nothing (their runs show ``-``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cclient import DEFLATE_OFFER, CLoad

if TYPE_CHECKING:
    from .runs import RunResult


def annotate(result: RunResult, load: CLoad | None) -> None:
    """The C client's byte counts and what the server answered to the offer, into ``result``."""
    if load is None:
        return
    if load.received:
        result.wire_bytes_per_event = load.wire_bytes / load.received
        result.message_bytes_per_event = load.message_bytes / load.received
    result.extensions = load.extensions
    if not load.deflate:
        return
    result.client += "+deflate"
    if not load.extension_sockets:
        result.notes.append(
            "**permessage-deflate NOT negotiated** (offered; the server answered no "
            "Sec-WebSocket-Extensions): frames uncompressed"
        )
        return
    every = load.extension_sockets == load.sockets
    sockets = f"{load.extension_sockets}/{load.sockets} sockets" + ("" if every else " **ONLY**")
    mixed = ", **the answers differ**" if load.extensions_mixed else ""
    share = load.compressed / load.messages if load.messages else float("nan")
    result.notes.append(
        f"permessage-deflate: `{load.extensions}` ({sockets}{mixed}; {share:.0%} of "
        f"{load.messages:,} messages compressed, {result.message_bytes_per_event:.0f} B/event "
        "inflated)"
    )


def bytes_text(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def print_text(result: RunResult) -> str:
    """For the result line: ``wire 52.3 B/event  `` (nothing if not counted)."""
    value = result.wire_bytes_per_event
    return "" if value != value else f"wire {value:.1f} B/event  "


def report_lines(args: Any, results: list[RunResult]) -> list[str]:
    """What the wire column counts and, with ``--deflate``, what each variant negotiated."""
    counted = [r for r in results if r.wire_bytes_per_event == r.wire_bytes_per_event]
    if not counted:
        return []
    lines = [
        "",
        "wire B/event: the bytes of every WebSocket frame the C load client received after the "
        "upgrade (frame headers and payloads as sent, compressed or not, control frames and "
        "the batch runs' ready messages included; not TCP/IP headers), divided by the "
        "deliveries (events received); a batch frame's bytes are shared by its events. `-`: a "
        "Python client (not counted).",
    ]
    if not args.deflate:
        return lines
    lines += [
        "",
        f"permessage-deflate: the C client offered `{DEFLATE_OFFER}` (Chromium's offer) on "
        "every socket and inflated each compressed message before checking it. Answers, per "
        "variant (runs):",
        "",
    ]
    variants: dict[str, dict[str, int]] = {}
    for r in counted:
        answer = f"`{r.extensions}`" if r.extensions else "**none (not compressed)**"
        answers = variants.setdefault(r.variant, {})
        answers[answer] = answers.get(answer, 0) + 1
    for variant, answers in variants.items():
        text = "; ".join(f"{answer} ({n})" for answer, n in answers.items())
        lines.append(f"- {variant}: {text}")
    return lines
