"""Small trace files in the formats the simulator replays, written by the tests of importers and
of the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

CLAUDE_CODE_HEADER = (
    "trace_id,agent_id,subagent_type,agent_start_s,req_idx,t_s,model,stream,in_tokens,"
    "out_tokens,api_time_s,ttft_s,think_time_s,stop,input_types,output_types,n_blocks,"
    "prefix_blocks_shared_prev,tool_tokens,system_tokens"
)
"""The header of the claude-code ``requests.csv`` (/work/shared/data/README.md)."""


class AgentCall(NamedTuple):
    """One row of a claude-code trace: what the replay reads."""

    trace: str
    agent: str
    start_s: float
    req: int
    think_s: float
    n_blocks: int
    shared: int
    out_tokens: int = 20


def write_claude_code(path: Path, rows: list[AgentCall]) -> Path:
    """A claude-code CSV whose calls hold 64 tokens per block (and 10 more)."""
    lines = [CLAUDE_CODE_HEADER]
    for r in rows:
        kind = "Explore" if r.agent != "parent" else ""
        lines.append(
            f"{r.trace},{r.agent},{kind},{r.start_s},{r.req},0.0,claude-haiku,n,"
            f"{r.n_blocks * 64 + 10},{r.out_tokens},1.5,,{r.think_s},tool_use,text,text,"
            f"{r.n_blocks},{r.shared},0,0"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def conversations(n_conversations: int, turns: int, gap_s: float = 1.0) -> list[dict]:
    """Mooncake rows of conversations interleaved turn by turn: turn t of a conversation holds
    its previous turn's blocks and one more (512 tokens each)."""
    rows = []
    for t in range(turns):
        for c in range(n_conversations):
            i = t * n_conversations + c
            ids = [c * 1000 + k for k in range(t + 1)]
            rows.append(
                {
                    "timestamp": i * gap_s * 1000,
                    "input_length": 512 * (t + 1),
                    "output_length": 50,
                    "hash_ids": ids,
                }
            )
    return rows


def write_mooncake(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
