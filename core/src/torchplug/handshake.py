"""The start-up handshake: every rank checks that all ranks resolved the same plan.

A different plugin version on one node otherwise means a hang (the ranks issue different
collectives) or a silently different run. Right after the world size and rank are known and
before any other collective, :func:`check_ranks` gathers each rank's plan fingerprint
through the ``all_gather_object`` hook (one collective, once per fit, nothing per step) and,
when they differ, raises :class:`~torchplug.PlanMismatchError` on every rank: all ranks hold the
same gathered list, so all of them stop, within the process group's timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchplug.errors import PlanChangedWarning, PlanMismatchError
from torchplug.plan import fingerprint_view
from torchplug.provenance import describe_changes, plan_changes
from torchplug.utils import warn_at_caller

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


def check_ranks(trainer: Trainer) -> None:
    """Compare this rank's plan with every other rank's (``trainer.world_size > 1`` only).

    :raises PlanMismatchError: on every rank, when any rank's fingerprint differs from rank 0's;
        the message names the ranks, and the distributions and versions that differ.
    """
    plan = trainer.plan.to_dict()
    mine = {"rank": trainer.global_rank, "fingerprint": plan["fingerprint"], "view": fingerprint_view(plan)}
    gathered: list[Any] = trainer.hooks.all_gather_object(obj=mine)
    if len(gathered) != trainer.world_size:
        strategy = trainer.plan.role("strategy").winner
        warn_at_caller(PlanChangedWarning(
            f"The plan handshake got {len(gathered)} answer(s) from all_gather_object for {trainer.world_size} "
            f"processes: the strategy plugin '{strategy}' does not implement the all_gather_object hook, so the "
            "ranks' plugins were not compared. Implement it (torch.distributed.all_gather_object on the plugin's "
            "group) in that plugin."))
        return
    reference = gathered[0]
    differing = [entry for entry in gathered[1:] if entry["fingerprint"] != reference["fingerprint"]]
    if not differing:
        return
    parts = []
    for entry in differing:
        changes = plan_changes(reference["view"], entry["view"])
        parts.append(f"rank {entry['rank']} (plan {entry['fingerprint'][:16]}) differs from rank "
                     f"{reference['rank']} (plan {reference['fingerprint'][:16]}), rank {reference['rank']} -> "
                     f"rank {entry['rank']}:\n{describe_changes(changes)}")
    ranks = ", ".join(str(entry["rank"]) for entry in differing)
    raise PlanMismatchError(
        f"The ranks of this run resolved different plugin plans (seen by rank {trainer.global_rank}); rank(s) {ranks} "
        f"differ from rank 0:\n" + "\n".join(parts) + "\nInstall the same plugin distributions and versions, and use "
        "the same Trainer arguments and TORCHPLUG_* variables, on every machine; `torchplug plan --json` on each "
        "one shows what it resolves."
    )


__all__ = ["check_ranks"]
