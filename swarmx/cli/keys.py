"""`swarmx keys generate`: CURVE key pairs for the scheduler, nodes and clients; `swarmx keys
api`: API keys for the gateway's HTTP callers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from swarmx.cli.common import ConfigOpt, JsonOpt, fail, load, print_json
from swarmx.gateway.apikeys import KeyFileError, add_key
from swarmx.transport import TransportError, generate_keys

keys_app = typer.Typer(help="CURVE keys for the control plane (docs/security.md).")


@keys_app.command("generate")
def generate(
    out: Annotated[
        Path, typer.Option("--out", help="Directory to write the key pair in.", file_okay=False)
    ],
    name: Annotated[
        str,
        typer.Option(
            "--name", help="Key name: the node's name for node keys (node-7), a client's name."
        ),
    ],
    json: JsonOpt = False,
) -> None:
    """Write NAME.key (public: give it to the peer) and NAME.key_secret (0600: keep it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        fail(f"--name: must be 1-63 of A-Z a-z 0-9 . _ -, got {name!r}")
    try:
        public, secret = generate_keys(out, name)
    except (TransportError, OSError) as exc:
        fail(str(exc))
    if json:
        print_json({"public": str(public), "secret": str(secret)})
        return
    typer.echo(f"public key: {public}")
    typer.echo(f"secret key: {secret} (mode 0600)")


@keys_app.command("api")
def api(
    file: Annotated[
        Path,
        typer.Option(
            "--file", help="The gateway's API key file ([gateway] api_keys).", dir_okay=False
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="The client the key belongs to.")],
    json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Make an API key for a gateway client: printed once, its digest appended to FILE."""
    load(config)
    try:
        key = add_key(file, name)
    except (KeyFileError, OSError) as exc:
        fail(str(exc))
    if json:
        print_json({"client": name, "key": key, "file": str(file)})
        return
    typer.echo(key)
    typer.echo(
        f"(for client {name}; its SHA-256 is in {file}; this key is not stored anywhere)", err=True
    )
