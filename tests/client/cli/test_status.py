"""`swarm-client status` shows what peers announce as plain text: a name or address that looks like rich markup is
printed as it is, never interpreted (or crashed on)."""

from __future__ import annotations

import io

from rich.console import Console

from swarm.client.cli.status import render_status
from swarm.protocol import PeerInfo
from swarm.routing import describe_models


def rendered(peers: list[PeerInfo]) -> str:
    status = {"models": describe_models(peers), "peers": [peer.model_dump() for peer in peers]}
    out = io.StringIO()
    render_status(status, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def peer(model: str, address: str) -> PeerInfo:
    return PeerInfo(
        peer_id="p1",
        address=address,
        model=model,
        num_layers=2,
        start=0,
        end=2,
        state="online",
        dtype="float32",
        throughput=10.0,
        cache_tokens_free=5,
        cache_tokens_total=10,
    )


def test_peer_provided_names_are_printed_verbatim_not_as_markup() -> None:
    text = rendered([peer("[/bold]", "ws://[red]evil[/red]:1")])
    assert "[/bold]: 2 layers" in text
    assert "ws://[red]evil[/red]:1" in text


def test_markup_in_a_model_name_cannot_restyle_the_rest_of_the_line() -> None:
    text = rendered([peer("[link=http://x]m", "ws://a:1")])
    assert text.startswith("[link=http://x]m: 2 layers")
