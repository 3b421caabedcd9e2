"""EASIER's rules: which sites a round linearizes, when the search stops, which round wins."""
from __future__ import annotations


def select_sites(entropy: dict[str, float], done) -> list[str]:
    """The reference rule: among the sites not yet linear, set the lowest entropy to 0
    (the first in forward order on a tie) and pick every site whose entropy is 0."""
    done = set(done)
    remaining = [n for n in entropy if n not in done]
    if not remaining:
        return []
    lowest = min(remaining, key=lambda n: entropy[n])
    return [n for n in remaining if n == lowest or entropy[n] == 0.0]


def stop_reason(rounds: list[dict], opts) -> str | None:
    """Why no further round should run after `rounds` (under `EasierConfig` `opts`),
    or None to continue."""
    last = rounds[-1]
    if rounds[0]["val_acc"] - last["val_acc"] > opts.acc_budget:
        return (f"round {last['round']} lost {rounds[0]['val_acc'] - last['val_acc']:.2f} points "
                f"of validation accuracy (budget {opts.acc_budget})")
    if last["n_linear"] >= last["n_sites"]:
        return "every site is linear"
    if opts.max_rounds is not None and last["round"] >= opts.max_rounds:
        return f"method.max_rounds = {opts.max_rounds} reached"
    return None


def select_round(rounds: list[dict], budget: float) -> dict:
    """The round with the most sites linearized whose validation accuracy is within
    `budget` points of round 0 (round 0 itself always is)."""
    base = rounds[0]["val_acc"]
    inside = [r for r in rounds if base - r["val_acc"] <= budget]
    return max(inside, key=lambda r: (r["n_linear"], r["round"]))
