"""How a recipe trains: the loop, a linear probe on image features or hand landmarks, or a probe then a
fine-tuning of the last blocks (optionally ensembled with the probe in weight space, WiSE-FT)."""

import torch

from ..models.inference import takes_hands
from .hands import landmark_probe
from .loop import fit
from .transfer import linear_probe, tail_scores


def run_training(model, train, val, recipe, run):
    """The recipe's training; returns (FitResult, fine-tuning epochs finished). A resumed fine-tuning run
    recomputes the probe, which is deterministic."""
    if not recipe.linear_probe:
        return fit(model, train, val, recipe, run), 0
    if takes_hands(model):
        return landmark_probe(model, train, val, recipe, run), 0
    probe = linear_probe(
        model,
        train,
        val,
        recipe,
        run.but(events=run.events.span(0.0, 0.5 if recipe.fine_tune else 1.0)),
        tuned_blocks=recipe.fine_tune_blocks if recipe.fine_tune else None,
    )
    if not recipe.fine_tune:
        return probe, 0
    return fine_tune_after_probe(model, train, val, recipe, run, probe)


def fine_tune_after_probe(model, train, val, recipe, run, probe):
    """The loop on the last recipe.fine_tune_blocks blocks, starting from the probe; the probe is epoch 0 of the
    history."""
    run.events(f"fine-tuning the last {recipe.fine_tune_blocks} blocks for {recipe.epochs} epochs")
    model.load_state_dict(probe.best_state)
    probe_row = dict(probe.history[-1], epoch=0)
    model.freeze_for_fine_tuning(recipe.fine_tune_blocks)
    frozen, evaluate = probe.frozen, None
    if frozen is not None and frozen.val is not None and not recipe.tta:
        evaluate = lambda scored: tail_scores(scored, frozen, val.labels, run.device)  # noqa: E731
    try:
        result = fit(
            model,
            train,
            val,
            recipe,
            run.but(events=run.events.span(0.5, 1.0), writer=run.writer.with_history_prefix([probe_row])),
            evaluate,
        )
    finally:
        model.unfreeze()
    result.frozen = frozen  # the tuned blocks changed, the layers before them did not
    epochs_done = len(result.history)
    result.history = [probe_row] + result.history
    if result.best_state is None:
        run.events(
            "no fine-tuning epoch finished: the model is the linear probe (fine_tuned_epochs 0 in the model file)"
        )
        result.best_state, result.best_epoch = probe.best_state, 1
        return result, epochs_done
    result.best_epoch += 1
    if recipe.wise_ft:
        result.best_state = weight_space_ensemble(probe.best_state, result.best_state, recipe.wise_ft)
        run.events(
            f"weight-space ensemble (WiSE-FT): {1 - recipe.wise_ft:g} x probe + {recipe.wise_ft:g} x fine-tuned weights"
        )
    return result, epochs_done


def weight_space_ensemble(probe_state, tuned_state, alpha):
    """WiSE-FT (Wortsman et al., CVPR 2022): (1 - alpha) * probe + alpha * fine-tuned, tensor by tensor. The two
    share their frozen layers and batch-norm statistics, so the mix is one network of the same shape."""
    return {
        k: torch.lerp(probe_state[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
        for k, v in tuned_state.items()
    }
