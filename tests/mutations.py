"""Mutation checks: small deliberate bugs that the tests must catch.

    python tests/mutations.py                 # every mutation (after a baseline run of their tests)
    python tests/mutations.py --list
    python tests/mutations.py --only trigger_left_boundary --only hub_allowed_always

Each mutation replaces one exact piece of text in one file; the text must occur exactly once, so the list
fails loudly when the code changes under it. The repository (git's tracked and untracked-but-not-ignored
files, not .venv) is copied to a scratch folder, the replacement applied there, and the mutation's tests
run there with this interpreter: `python -m pytest -x -q <tests>`. Tests that still pass have MISSED the
bug. The exit status is non-zero if any mutation is missed, does not apply, errors or times out.

A script, not a test module: pytest collects test_*.py only, and nothing here is named test_*.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutation(NamedTuple):
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    tests: tuple  # pytest node ids or files, relative to the repository root


NAMES = "tests/test_names_and_guards.py"
CONTRACT = "tests/test_lora_contract.py"
POLICY = "tests/test_path_policy.py"
NETWORKS_T = "tests/test_networks.py"
HARDENING = "tests/test_hardening_training.py"

MUTATIONS = [
    # ---- names and the write guard ----------------------------------------------------
    Mutation("sanitize_name_slice_only", "trainers/core/safe_io.py",
             '    name = _SURROGATES.sub("_", str(name or ""))\n',
             '    return str(name or "")[:120] or default\n', (NAMES,)),
    Mutation("sanitize_name_byte_cut_only", "trainers/core/safe_io.py",
             '    name = _SURROGATES.sub("_", str(name or ""))\n',
             '    return str(name or "").encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore") or default\n',
             (NAMES,)),
    Mutation("sanitize_name_keeps_dotdot_parts", "trainers/core/safe_io.py",
             'if p not in ("", ".", "..")]', 'if p]', (NAMES,)),
    Mutation("sanitize_name_keeps_reserved_names", "trainers/core/safe_io.py",
             "    name = _unreserved(_cut(name, max_bytes))\n", "    name = _cut(name, max_bytes)\n", (NAMES,)),
    Mutation("ensure_inside_prefix_without_separator", "trainers/core/safe_io.py",
             "real.startswith(root + os.sep)", "real.startswith(root)",
             (f"{NAMES}::test_ensure_inside_refuses_a_sibling_with_the_same_prefix",)),
    Mutation("ensure_inside_does_not_follow_links", "trainers/core/safe_io.py",
             "    real = os.path.realpath(path)\n", "    real = os.path.abspath(path)\n",
             (f"{NAMES}::test_ensure_inside_follows_links_out",)),
    Mutation("export_write_guard_removed", "trainers/methods/base.py",
             "safe_io.safetensors_writer(tensors, metadata), roots=host.writable_roots())",
             "safe_io.safetensors_writer(tensors, metadata))",
             (f"{NAMES}::test_export_refuses_to_write_outside_the_writable_roots",)),
    Mutation("tests_use_comfyui_dir_folders", "tests/conftest.py",
             '        h.configure(models_dir=str(root / "models"), output_dir=str(root / "output"), '
             'input_dir=str(root / "input"))\n', "",
             (f"{NAMES}::test_each_test_gets_its_own_host_folders_whatever_comfyui_dir_says",)),
    # ---- the trigger word -------------------------------------------------------------
    Mutation("trigger_left_boundary", "trainers/data/captions.py",
             'r"(?<!\\w)" + re.escape(trigger)', "re.escape(trigger)",
             (f"{NAMES}::test_trigger_counts_only_as_a_whole_word",)),
    Mutation("trigger_not_escaped", "trainers/data/captions.py",
             "re.escape(trigger)", "trigger",
             (f"{NAMES}::test_trigger_glued_on_the_right_or_matched_as_a_pattern_is_not_present",)),
    # ---- LoRA targets and kohya keys --------------------------------------------------
    Mutation("text_encoder_mlp_dropped", "trainers/networks/targets.py",
             r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$", r"(self_attn\.(q_proj|k_proj|v_proj|out_proj))$",
             (CONTRACT,)),
    Mutation("text_encoder_key_without_text_model", "trainers/networks/targets.py",
             '        module_name = "text_model." + module_name', "        pass",
             (CONTRACT,)),
    Mutation("kohya_preset_feed_forward_dropped", "trainers/networks/targets.py",
             r"|ff\.net\.(0\.proj|2)))$", r"))$", (CONTRACT,)),
    Mutation("locon_preset_time_embedding_dropped", "trainers/networks/targets.py",
             "conv_shortcut|time_emb_proj)", "conv_shortcut)", (CONTRACT,)),
    # ---- network types (LoRA, LoHa, LoKr) --------------------------------------------------
    Mutation("lokr_full_factor_scaled_by_alpha", "trainers/networks/lokr.py",
             "return alpha / layer.r[ADAPTER] if factored else 1.0", "return alpha / layer.r[ADAPTER]",
             (f"{NETWORKS_T}::test_weight_change_from_the_file_is_comfyuis",)),
    Mutation("loha_second_pair_not_saved", "trainers/networks/loha.py",
             ', "hada_w2_b": "hada_w2_b"}', "}",
             (f"{NETWORKS_T}::test_training_changes_the_unet_and_the_file_round_trips_exactly",)),
    Mutation("network_alpha_ignored_on_load", "trainers/networks/peft_network.py",
             'layer.scaling[ADAPTER] = self.scale(layer, float(state_dict[f"{stem}.alpha"]))', "pass",
             (f"{NETWORKS_T}::test_training_changes_the_unet_and_the_file_round_trips_exactly",)),
    Mutation("lycoris_metadata_without_algo", "trainers/networks/peft_network.py",
             'return {"algo": self.name, **super().network_args(cfg)}', "return super().network_args(cfg)",
             (f"{NETWORKS_T}::test_metadata_names_the_lycoris_algorithm",)),
    Mutation("lokr_factor_not_passed", "trainers/networks/lokr.py",
             "decompose_factor=factor, ", "",
             (f"{NETWORKS_T}::test_lokr_factor_shapes_the_kronecker_factors",)),
    Mutation("method_ignores_network", "trainers/methods/lora.py",
             "registry.get(cfg.network)", 'registry.get("lora")',
             (f"{NETWORKS_T}::test_metadata_names_the_lycoris_algorithm",)),
    Mutation("declared_choices_unchecked", "trainers/core/config.py",
             'if meta["choices"] and value not in meta["choices"]:', "if False:",
             (f"{NETWORKS_T}::test_network_config_is_checked_and_old_configs_load",)),
    Mutation("declared_upper_bound_unchecked", "trainers/core/config.py",
             'if meta["hi"] is not None and value > meta["hi"]:', "if False:",
             ("tests/test_run_config.py::test_a_bad_value_is_an_error_naming_the_field_where_it_sits",)),
    Mutation("nested_group_key_not_checked", "trainers/core/config.py",
             "                    if _group_of(name) != key:\n", "                    if False:\n",
             ("tests/test_textual_inversion.py::test_nested_config_groups_load_and_flat_configs_still_do",)),
    # ---- textual inversion and the family seam ----------------------------------------
    Mutation("ti_first_vector_never_used", "trainers/methods/textual_inversion.py",
             "new = ids >= self.first_new", "new = ids > self.first_new",
             ("tests/test_textual_inversion.py::test_embedding_file_is_what_comfyui_and_a1111_load",)),
    Mutation("ti_captions_keep_the_plain_word", "trainers/methods/textual_inversion.py",
             "        batch.texts = [self.prompt(text) for text in batch.texts]\n", "",
             ("tests/test_textual_inversion.py::test_only_the_new_vectors_train_and_every_other_weight_stays_exactly",)),
    Mutation("ti_vectors_start_from_the_first_token_only", "trainers/methods/textual_inversion.py",
             "table[init[i % len(init)]]", "table[init[0]]",
             ("tests/test_textual_inversion.py::test_vectors_start_from_the_init_word",)),
    Mutation("caption_cache_drops_pooled", "trainers/families/conditioning.py",
             "        return [Conditioning(s, p) for s, p in zip(self.states, pooled)]",
             "        return [Conditioning(s, None) for s in self.states]",
             ("tests/test_family_seam.py",)),
    Mutation("batch_items_not_kept", "trainers/methods/base.py",
             "items=[data.items[i] for i in indices])", "items=[])",
             ("tests/test_family_seam.py",)),
    # ---- DreamBooth ----------------------------------------------------------------------
    Mutation("prior_weight_ignored", "trainers/methods/dreambooth.py",
             "return instance + self.cfg.prior_loss_weight * prior", "return instance + prior",
             ("tests/test_dreambooth.py::test_prior_loss_is_the_weighted_class_half_of_the_batch",)),
    Mutation("class_image_seed_ignores_index", "trainers/methods/class_images.py",
             "[cfg.seed + i for i in chunk]", "[cfg.seed for i in chunk]",
             ("tests/test_dreambooth.py::test_class_images_are_cached_reused_and_a_partial_set_resumes",)),
    Mutation("checkpoint_converts_untrained_tensors", "trainers/families/checkpoint_save.py",
             "        kept = safetensors_file.pending(comps.source, keep=lambda key: not key.startswith(prefixes))\n",
             "        kept = diffusers_to_ldm(comps, parts=untrained)\n",
             ("tests/test_dreambooth.py::test_checkpoint_keeps_untrained_tensors_bit_exact_and_reloads",)),
    Mutation("dreambooth_text_encoder_never_trained", "trainers/methods/dreambooth.py",
             "        trained = chosen_text_encoders(self.cfg, comps)\n        for encoder in comps.text_encoders:\n",
             "        trained = []\n        for encoder in comps.text_encoders:\n",
             ("tests/test_dreambooth.py::test_checkpoint_keeps_untrained_tensors_bit_exact_and_reloads",)),
    Mutation("stopped_run_leaves_empty_folder", "trainers/training/loop.py",
             "                os.rmdir(run.path)  # only ever removes an empty folder\n", "                pass\n",
             ("tests/test_dreambooth.py::test_cancel_while_generating_keeps_the_finished_images",)),
    Mutation("ema_not_in_checkpoints", "trainers/methods/dreambooth.py",
             "return {**super().trainable_state(comps), **ema}", "return super().trainable_state(comps)",
             ("tests/test_dreambooth.py::test_ema_of_the_weights_is_saved_and_resumes",)),
    Mutation("ema_not_exported", "trainers/methods/dreambooth.py",
             "                    p.copy_(self._ema[name])\n", "                    pass\n",
             ("tests/test_dreambooth.py::test_ema_of_the_weights_is_saved_and_resumes",)),
    # ---- path policy ------------------------------------------------------------------
    Mutation("readable_always_true", "trainers/core/path_policy.py",
             "    return lambda path: is_inside(path, roots)", "    return lambda path: True",
             (f"{POLICY}::test_files_linked_out_of_an_allowed_folder_are_not_read",)),
    Mutation("is_inside_prefix_without_separator", "trainers/core/path_policy.py",
             "real.startswith(root.rstrip(os.sep) + os.sep)", "real.startswith(root.rstrip(os.sep))",
             (f"{NAMES}::test_is_inside_refuses_a_sibling_with_the_same_prefix",)),
    Mutation("manifest_inside_folder_check_removed", "trainers/data/items.py",
             "if not path_policy.is_inside(path, [os.path.realpath(folder)]):", "if False:",
             (f"{POLICY}::test_manifest_entries_stay_inside_their_dataset",)),
    Mutation("preview_manifest_inside_folder_check_removed", "trainers/dataset_build/preview_grid.py",
             "if not path_policy.is_inside(path, [os.path.realpath(dataset_dir)]):", "if False:",
             (f"{POLICY}::test_manifest_entries_stay_inside_their_dataset",)),
    Mutation("node_path_read_confinement_removed", "trainers/core/path_policy.py",
             "if confined() and not is_inside(path, read_roots()):", "if False:",
             (f"{POLICY}::test_node_paths_resolve_inside_comfyui_folders",)),
    Mutation("node_path_write_confinement_removed", "trainers/core/path_policy.py",
             "if write and server_rules() and not is_inside(path, write_roots()):", "if False:",
             (f"{POLICY}::test_allow_any_path_lifts_reads_never_writes",)),
    Mutation("hub_allowed_always", "trainers/core/path_policy.py",
             "return not server_rules() or _env_on(ALLOW_HUB_ENV)", "return True",
             (f"{POLICY}::test_hub_downloads_are_off_in_the_server",)),
    Mutation("model_name_may_climb_out", "trainers/core/host.py",
             'inside = os.path.relpath(os.path.join(os.sep, str(name or "")), os.sep)', 'inside = str(name or "")',
             (f"{POLICY}::test_model_names_cannot_leave_their_folder",)),
    # ---- resume, logs, checkpoints ----------------------------------------------------
    Mutation("resume_identity_ignored", "trainers/core/run_dir.py",
             "(values of the IDENTITY keys), or None if it can.\"\"\"\n",
             "(values of the IDENTITY keys), or None if it can.\"\"\"\n        return None\n",
             (f"{HARDENING}::test_resume_needs_the_same_dataset_base_model_and_trigger",
              f"{HARDENING}::test_resume_needs_the_exact_output_name_and_a_fingerprinted_run")),
    Mutation("resume_identity_ignores_base_model", "trainers/core/run_dir.py",
             '    ("base_model_sha256", "resolved", "it was trained on a different base model"),\n', "",
             (f"{HARDENING}::test_resume_needs_the_same_dataset_base_model_and_trigger",)),
    Mutation("torn_log_line_glued_to", "trainers/core/run_dir.py",
             '                    line = b"\\n" + line\n', "                    pass\n",
             (f"{HARDENING}::test_torn_last_log_line_is_skipped_and_never_glued_to",)),
    Mutation("torn_log_line_raises", "trainers/core/run_dir.py",
             "                try:\n                    record = json.loads(line)\n"
             "                except ValueError:\n                    record = None\n",
             "                record = json.loads(line)\n",
             (f"{HARDENING}::test_resume_after_a_torn_log_line",)),
    Mutation("checkpoint_fallback_removed", "trainers/training/resume.py",
             "for checkpoint in reversed(checkpoints):", "for checkpoint in reversed(checkpoints[-1:]):",
             (f"{HARDENING}::test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one",)),
    Mutation("checkpoint_shapes_not_checked_before_copy", "trainers/core/train_state.py",
             "        if v.shape != params[k].shape:\n", "        if False:\n",
             (f"{HARDENING}::test_when_no_checkpoint_loads_the_error_names_the_run_and_nothing_is_half_restored",)),
]

# ---- training numerics: scheduler restore, min-SNR, pruning, optimizer choice, 2-process equivalence, noise
# offset, grad accumulation, gradient checkpointing, v-prediction, schedules. ----
MUTATIONS += [
    Mutation("caption_dropout_ignored", "trainers/methods/base.py",
             "if torch.rand(1, generator=gen).item() >= cfg.caption_dropout else", "if True else",
             ("tests/test_training_contract.py::test_caption_dropout_trains_that_share_of_steps_on_the_empty_caption",)),
]
MUTATIONS += [
    Mutation('scheduler_not_restored', 'trainers/training/resume.py',
             '    scheduler.load_state_dict(saved["scheduler"])\n',
             '    pass\n',
             ('tests/test_training_contract.py::test_resume_in_a_warmup_cosine_schedule_repeats_the_rates_and_the_exact_weights',)),
    Mutation('optimizer_not_restored', 'trainers/training/resume.py',
             '    optimizer.load_state_dict(saved["optimizer"])\n',
             '    pass\n',
             ('tests/test_training_contract.py::test_resume_in_a_warmup_cosine_schedule_repeats_the_rates_and_the_exact_weights',)),
    Mutation('weights_not_restored', 'trainers/training/resume.py',
             '            params[k].copy_(v.to(params[k].dtype))',
             '            pass',
             ('tests/test_training_contract.py::test_resume_in_a_warmup_cosine_schedule_repeats_the_rates_and_the_exact_weights', 'tests/test_train_lora.py::test_cancel_saves_a_checkpoint_and_resume_continues_the_same_curve')),
    Mutation('min_snr_clamp_min', 'trainers/training/objective.py',
             'weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr',
             'weight = torch.clamp(snr, min=cfg.min_snr_gamma) / snr',
             ('tests/test_training_contract.py::test_min_snr_weights_and_targets_follow_the_formulas',)),
    Mutation('min_snr_v_weight', 'trainers/training/objective.py',
             'weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)',
             'weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr',
             ('tests/test_training_contract.py::test_min_snr_weights_and_targets_follow_the_formulas',)),
    Mutation('min_snr_off', 'trainers/training/objective.py',
             '    if cfg.min_snr_gamma:\n',
             '    if False:\n',
             ('tests/test_training_contract.py::test_min_snr_weights_and_targets_follow_the_formulas',)),
    Mutation('min_snr_zero_not_off', 'trainers/training/objective.py',
             '    if cfg.min_snr_gamma:\n',
             '    if True:\n',
             ('tests/test_training_contract.py::test_min_snr_weights_and_targets_follow_the_formulas',)),
    Mutation('v_target_is_noise', 'trainers/training/objective.py',
             'target = noise_scheduler.get_velocity(latents, noise, t)',
             'target = noise',
             ('tests/test_training_contract.py::test_min_snr_weights_and_targets_follow_the_formulas',)),
    Mutation('noise_offset_ignored', 'trainers/training/objective.py',
             '    if cfg.noise_offset:\n',
             '    if False:\n',
             ('tests/test_training_contract.py::test_noise_offset_shifts_each_channel_of_the_noise_by_one_constant', 'tests/test_training_contract.py::test_noise_offset_and_v_prediction_reach_the_training_loop')),
    Mutation('noise_offset_per_pixel', 'trainers/training/objective.py',
             'torch.randn(latents.shape[:2] + (1, 1), generator=gen)',
             'torch.randn(latents.shape, generator=gen)',
             ('tests/test_training_contract.py::test_noise_offset_shifts_each_channel_of_the_noise_by_one_constant',)),
    Mutation('v_prediction_scheduler_ignored', 'trainers/training/loop.py',
             '    noise_scheduler = comps.noise_scheduler()\n',
             '    noise_scheduler = dataclasses.replace(comps, prediction_type="epsilon").noise_scheduler()\n',
             ('tests/test_training_contract.py::test_noise_offset_and_v_prediction_reach_the_training_loop',)),
    Mutation('accum_not_averaged', 'trainers/training/loop.py',
             'accelerator.backward(loss / cfg.grad_accum)',
             'accelerator.backward(loss)',
             ('tests/test_training_contract.py::test_accumulated_micro_batches_are_the_global_batch_and_their_gradient_is_the_mean',)),
    Mutation('accum_overlapping_items', 'trainers/methods/base.py',
             'step * cfg.grad_accum + micro',
             'step + micro',
             ('tests/test_training_contract.py::test_accumulated_micro_batches_are_the_global_batch_and_their_gradient_is_the_mean',)),
    Mutation('accum_one_micro', 'trainers/training/loop.py',
             'for micro in range(cfg.grad_accum):',
             'for micro in range(1):',
             ('tests/test_training_contract.py::test_accumulated_micro_batches_are_the_global_batch_and_their_gradient_is_the_mean',)),
    Mutation('accum_zero_grad_per_micro', 'trainers/training/loop.py',
             '                    accelerator.backward(loss / cfg.grad_accum)\n',
             '                    optimizer.zero_grad(set_to_none=True)\n                    accelerator.backward(loss / cfg.grad_accum)\n',
             ('tests/test_training_contract.py::test_accumulated_micro_batches_are_the_global_batch_and_their_gradient_is_the_mean',)),
    Mutation('unet_checkpointing_off', 'trainers/training/loop.py',
             'comps.unet.enable_gradient_checkpointing()',
             'pass',
             ('tests/test_training_contract.py::test_gradient_checkpointing_recomputes_activations_and_trains_the_same',)),
    Mutation('te_checkpointing_off', 'trainers/training/loop.py',
             'encoder.gradient_checkpointing_enable()',
             'pass',
             ('tests/test_training_contract.py::test_gradient_checkpointing_recomputes_activations_and_trains_the_same',)),
    Mutation('trainable_not_fp32', 'trainers/training/loop.py',
             '                p.data = p.data.float()',
             '                pass',
             ('tests/test_training_contract.py::test_bf16_trains_frozen_weights_in_bf16_and_trainable_ones_in_fp32',)),
    Mutation('frozen_not_bf16', 'trainers/training/loop.py',
             'weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)',
             'weight_dtype = torch.float32',
             ('tests/test_training_contract.py::test_bf16_trains_frozen_weights_in_bf16_and_trainable_ones_in_fp32',)),
    Mutation('accelerator_state_kept', 'trainers/training/loop.py',
             '    AcceleratorState._reset_state()\n',
             '    pass\n',
             ('tests/test_training_contract.py::test_bf16_trains_frozen_weights_in_bf16_and_trainable_ones_in_fp32',)),
    Mutation('fp16_on_cpu_not_mapped', 'trainers/training/loop.py',
             '    if precision == "fp16" and not cuda:\n',
             '    if False:\n',
             ('tests/test_training_contract.py::test_fp16_on_the_cpu_trains_in_fp32_and_says_so',)),
    Mutation('scheduler_not_stepped', 'trainers/training/loop.py',
             '            scheduler.step()\n',
             '            pass\n',
             ('tests/test_training_contract.py::test_logged_rates_follow_warmup_then_the_schedule',)),
    Mutation('loop_ignores_optimizer_choice', 'trainers/training/loop.py',
             'make_optimizer(cfg.optimizer, groups,',
             'make_optimizer("adamw", groups,',
             ('tests/test_training_contract.py::test_prodigy_is_the_optimizer_that_steps',)),
    Mutation('prune_not_called', 'trainers/training/loop.py',
             '            run.prune_checkpoints(cfg.keep_checkpoints)\n',
             '            pass\n',
             ('tests/test_training_contract.py::test_only_the_newest_checkpoints_are_kept',)),
    Mutation('prune_keeps_all', 'trainers/core/run_dir.py',
             'for old in self.checkpoint_dirs()[:-max(1, keep)]:',
             'for old in []:',
             ('tests/test_training_contract.py::test_only_the_newest_checkpoints_are_kept',)),
    Mutation('prune_off_by_one', 'trainers/core/run_dir.py',
             'for old in self.checkpoint_dirs()[:-max(1, keep)]:',
             'for old in self.checkpoint_dirs()[:-max(1, keep) - 1]:',
             ('tests/test_training_contract.py::test_only_the_newest_checkpoints_are_kept',)),
    Mutation('keep_default_not_3', 'trainers/core/config.py',
             '    keep_checkpoints: int = setting(3,',
             '    keep_checkpoints: int = setting(4,',
             ('tests/test_training_contract.py::test_only_the_newest_checkpoints_are_kept',)),
    Mutation('prodigy_becomes_adamw', 'trainers/training/optim.py',
             '    if name == "prodigy":\n',
             '    if False:\n',
             ('tests/test_training_contract.py::test_the_optimizer_factory_builds_what_was_asked', 'tests/test_training_contract.py::test_prodigy_is_the_optimizer_that_steps')),
    Mutation('adamw8bit_fallback_silent', 'trainers/training/optim.py',
             'log.warning("AdamW8bit needs a CUDA GPU (bitsandbytes); using AdamW on %s instead.", device.type)',
             'pass',
             ('tests/test_training_contract.py::test_the_optimizer_factory_builds_what_was_asked',)),
    Mutation('cosine_shape', 'trainers/training/optim.py',
             'return 0.5 * (1.0 + math.cos(math.pi * progress))',
             'return 1.0',
             ('tests/test_training_contract.py::test_logged_rates_follow_warmup_then_the_schedule',)),
    Mutation('linear_shape', 'trainers/training/optim.py',
             'return max(0.0, 1.0 - progress)',
             'return 1.0',
             ('tests/test_training_contract.py::test_logged_rates_follow_warmup_then_the_schedule',)),
    Mutation('no_warmup', 'trainers/training/optim.py',
             'return (step + 1) / (warmup_steps + 1)',
             'return 1.0',
             ('tests/test_training_contract.py::test_logged_rates_follow_warmup_then_the_schedule',)),
    Mutation('te_mlp_dropped', 'trainers/networks/targets.py',
             '|mlp\\.(fc1|fc2))$")',
             ')$")',
             ('tests/test_training_contract.py::test_text_encoder_lora_covers_attention_and_mlp_of_every_layer',)),
    Mutation('kohya_ff_dropped', 'trainers/networks/targets.py',
             '|ff\\.net\\.(0\\.proj|2)',
             '',
             ('tests/test_training_contract.py::test_unet_presets_cover_the_layers_the_readme_names',)),
    Mutation('locon_time_emb_dropped', 'trainers/networks/targets.py',
             '|conv_shortcut|time_emb_proj)',
             '|conv_shortcut)',
             ('tests/test_training_contract.py::test_unet_presets_cover_the_layers_the_readme_names',)),
    Mutation('dist_no_split', 'trainers/training/batches.py',
             '    total = per * accelerator.num_processes\n',
             '    total = per\n',
             ('tests/test_cli.py::test_accelerate_launch_two_processes',)),
    Mutation('dist_loss_not_reduced', 'trainers/training/loop.py',
             'loss_value = accelerator.reduce(loss_value.to(device), reduction="mean").item()',
             'loss_value = loss_value.item()',
             ('tests/test_cli.py::test_accelerate_launch_two_processes',)),
    Mutation('dist_unet_not_ddp', 'trainers/training/loop.py',
             '    unet, optimizer = prepared[0], prepared[-1]\n',
             '    unet, optimizer = comps.unet, prepared[-1]\n',
             ('tests/test_cli.py::test_accelerate_launch_two_processes',)),
    Mutation('dist_te_not_ddp', 'trainers/training/loop.py',
             'cond = family.encode(comps, batch.texts, text_encoders)',
             'cond = family.encode(comps, batch.texts)',
             ('tests/test_cli.py::test_accelerate_launch_two_processes',)),
    Mutation('bucket_order_unseeded', 'trainers/data/order.py',
             'rng = np.random.default_rng([seed & (2**64 - 1), epoch, 1])',
             'rng = np.random.default_rng()',
             ('tests/test_training_contract.py::test_resume_of_a_bucketed_dataset_in_a_fresh_process_trains_the_same_batches',
              'tests/test_dataset_build.py::test_bucket_batches_stay_in_one_bucket_count_repeats_and_resume')),
    Mutation('epoch_order_unseeded', 'trainers/data/order.py',
             'rng = np.random.default_rng([int(seed) & (2**64 - 1), int(epoch)])',
             'rng = np.random.default_rng()',
             ('tests/test_training_contract.py::test_resume_in_a_warmup_cosine_schedule_repeats_the_rates_and_the_exact_weights',)),
]

# ---- streaming safetensors, class-image precision, the DreamBench metrics and the comparison report ----
COMPARE_T = "tests/test_compare.py"
MUTATIONS += [
    Mutation("safetensors_header_unpadded", "trainers/core/safetensors_file.py",
             '    raw += b" " * (-(8 + len(raw)) % 8)\n', "", ("tests/test_safetensors_file.py",)),
    Mutation("safetensors_read_ignores_keep", "trainers/core/safetensors_file.py",
             "            if keep is not None and not keep(name):\n", "            if False:\n",
             ("tests/test_safetensors_file.py",)),
    Mutation("checkpoint_export_casts_kept_tensors", "trainers/families/checkpoint_save.py",
             "        kept = safetensors_file.pending(comps.source, keep=lambda key: not key.startswith(prefixes))\n",
             "        kept = {k: Pending.cast(v.load(), dtype) for k, v in safetensors_file.pending(\n"
             "            comps.source, keep=lambda key: not key.startswith(prefixes)).items()}\n",
             ("tests/test_dreambooth.py::test_checkpoint_keeps_untrained_tensors_bit_exact_and_reloads",)),
    Mutation("class_precision_ignored", "trainers/methods/class_images.py",
             "device=device,\n                                   dtype=dtype)", "device=device)",
             ("tests/test_dreambooth.py::test_class_images_sample_in_the_chosen_precision",)),
    Mutation("neutral_prompt_keeps_identifier", "trainers/evaluate/dreambench.py",
             "    replaced = re.sub(pattern, class_noun.strip(), prompt)\n", "    replaced = prompt\n", (COMPARE_T,)),
    Mutation("similarity_diagonal_only", "trainers/evaluate/dreambench.py",
             "return Score((a @ b.T).mean().item(),", "return Score((a[:len(b)] * b[:len(a)]).sum(-1).mean().item(),",
             (COMPARE_T,)),
    Mutation("div_counts_self_pairs", "trainers/evaluate/dreambench.py",
             "itertools.combinations(range(len(group)), 2)", "itertools.product(range(len(group)), repeat=2)",
             (COMPARE_T,)),
    Mutation("pres_from_subject_prompts", "trainers/evaluate/compare.py",
             'row["PRES"] = dreambench.similarity(dino, [im for i in classes for im in by_prompt[i]], references)',
             'row["PRES"] = dreambench.similarity(dino, images, references)', (COMPARE_T,)),
    Mutation("report_overwrites", "trainers/evaluate/compare.py",
             "            os.mkdir(folder)  # exclusive", "            os.makedirs(folder, exist_ok=True)  # exclusive",
             (COMPARE_T,)),
    Mutation("clip_t_scores_raw_prompt", "trainers/evaluate/compare.py",
             "texts = [dreambench.neutral_prompt(prompts[i], identifier, class_noun) for i in subject",
             "texts = [prompts[i] for i in subject", (COMPARE_T,)),
    Mutation("class_picks_any_size", "trainers/methods/dreambooth.py",
             "        same_size = latents.indices_by_size()[tuple(batch.latents.shape[-2:])]\n",
             "        same_size = list(range(len(items)))\n",
             ("tests/test_dreambooth.py::test_a_bucketed_dataset_joins_class_latents_of_each_batchs_size",)),
    Mutation("sdxl_last_layer_states", "trainers/families/registry.py",
             "            states.append(out.hidden_states[-2])\n", "            states.append(out[0])\n",
             ("tests/test_sdxl.py::test_conditioning_joins_both_encoders_penultimate_states_and_the_pooled_projection",)),
    Mutation("sdxl_crop_not_scaled", "trainers/families/registry.py",
             "    return [source_h, source_w, round(top * scale), round(left * scale), height, width]",
             "    return [source_h, source_w, top, left, height, width]",
             ("tests/test_sdxl.py::test_size_ids_follow_each_images_source_and_crop",)),
    Mutation("sdxl_lora_diffusers_unet_names", "trainers/families/registry.py",
             "        return ldm_module_name(unet.config, module)\n", "        return module\n",
             ("tests/test_sdxl.py::test_lora_on_both_encoders_trains_and_every_key_names_an_sgm_module",)),
    Mutation("sdxl_label_emb_unmapped", "trainers/families/ldm_keys.py",
             '        table.update({"add_embedding.linear_1": ("label_emb.0.0", None),',
             '        table.update({"add_embedding.linear_1": ("label_emb.0.1", None),',
             ("tests/test_sdxl.py::test_a_single_file_in_the_sgm_layout_reloads_as_the_same_model",)),
    Mutation("ti_first_encoder_only", "trainers/methods/textual_inversion.py",
             "        for encoder, tokenizer in zip(comps.text_encoders, comps.tokenizers):",
             "        for encoder, tokenizer in zip(comps.text_encoders[:1], comps.tokenizers[:1]):",
             ("tests/test_sdxl.py::test_textual_inversion_trains_a_vector_set_per_encoder_saved_as_clip_l_and_clip_g",)),
    Mutation("vae_override_ignored", "trainers/training/loop.py",
             "        comps.swap_vae(lambda base_vae: _load_vae(vae_file, base_vae))\n", "        pass\n",
             ("tests/test_vae_file.py::test_training_encodes_with_the_chosen_vae",)),
    Mutation("vae_file_resolved_after_captions", "trainers/training/loop.py",
             "        vae_file = _vae_file(cfg.vae)  # a missing file is named now, not after the captions are encoded\n"
             "        comps.swap_vae(lambda base_vae: _load_vae(vae_file, base_vae))\n",
             "        comps.swap_vae(lambda base_vae: _load_vae(_vae_file(cfg.vae), base_vae))\n",
             ("tests/test_vae_file.py::test_training_encodes_with_the_chosen_vae",)),
    Mutation("validation_decode_in_autocast", "trainers/training/validation.py",
             '                           guidance_scale=guidance_scale, generator=generators).images\n',
             '                           guidance_scale=guidance_scale, generator=generators).images\n'
             '            return pipe.image_processor.postprocess(comps.vae.decode(latents).sample, output_type="pil")\n',
             ("tests/test_sdxl.py::test_sampled_images_are_the_pipelines_own_decode_in_fp32",)),
    Mutation("cost_warmup_timed", "trainers/evaluate/inference_cost.py",
             "    calls = max(1, -(-images // batch))\n", "    calls = max(1, -(-images // batch)) + warmup\n",
             ("tests/test_inference_cost.py",)),
    Mutation("auto_resolution_not_resolved", "trainers/families/defaults.py",
             "        cfg = dataclasses.replace(cfg, resolution=family.native_resolution)\n",
             "        cfg = dataclasses.replace(cfg, resolution=512)\n",
             ("tests/test_sdxl.py::test_resolution_0_trains_at_the_families_own_size_and_the_run_says_so",)),
    Mutation("which_text_encoders_ignored", "trainers/methods/base.py",
             '    if cfg.which_text_encoders == "all":\n', '    if True:\n',
             ("tests/test_sdxl.py::test_a_lora_on_one_sdxl_encoder_trains_and_saves_that_encoder_alone",)),
    Mutation("dreambooth_saves_frozen_encoder_as_trained", "trainers/methods/dreambooth.py",
             "                        if any(p.requires_grad for p in model.parameters()))",
             "                        if name == 'unet' or self.cfg.train_text_encoder)",
             ("tests/test_sdxl.py::test_dreambooth_on_sdxl_saves_an_sgm_checkpoint_that_keeps_untrained_tensors_and_reloads",)),
    Mutation("load_keeps_file_tensors", "trainers/families/single_file.py",
             "    state_dict.clear()\n    missing, unknown", "    missing, unknown",
             ("tests/test_sdxl.py::test_a_load_holds_each_weight_once",)),
    Mutation("base_model_route_reads_any_path", "nodes/routes.py",
             '        path = host.resolve_model("checkpoints", query.get("name", ""))\n',
             '        import os\n'
             '        path = os.path.join(host.model_dirs("checkpoints")[0], query.get("name", ""))\n',
             ("tests/test_sdxl.py::test_the_canvas_route_reads_only_checkpoints_and_returns_the_note",)),
    Mutation("read_ignores_dtype", "trainers/core/safetensors_file.py",
             "            if dtype is None or stored == dtype or not stored.is_floating_point:\n",
             "            if True:\n",
             ("tests/test_safetensors_file.py::test_read_converts_floating_tensors_to_the_asked_dtype_as_it_reads",
              "tests/test_sdxl.py::test_a_load_holds_each_weight_once")),
    Mutation("bake_ignores_text_strength", "trainers/merge/bake.py",
             '            strength = unet_strength if target.part == "unet" else text_strength\n',
             '            strength = unet_strength\n',
             ("tests/test_merge.py::test_bake_equals_peft_merging_the_adapter",)),
    Mutation("bake_qkv_rows_ignored", "trainers/merge/bake.py",
             "            view = weight[rows[0]:rows[1]] if rows else weight\n",
             "            view = weight[0:rows[1] - rows[0]] if rows else weight\n",  # q's rows for k and v too
             ("tests/test_merge.py::test_bake_equals_peft_merging_the_adapter",)),
    Mutation("concat_mix_drops_scale", "trainers/merge/combine.py",
             '    ups = [delta.tensors["lora_up.weight"].float() * (weight * delta.scale) for delta, weight in parts]\n',
             '    ups = [delta.tensors["lora_up.weight"].float() * weight for delta, weight in parts]\n',
             ("tests/test_merge.py::test_exact_mix_is_the_weighted_sum_of_the_deltas_and_rank_truncation_errs_less_with_rank",)),
    Mutation("extract_keeps_unchanged_modules", "trainers/merge/extract.py",
             "        if norm <= UNCHANGED * float(w0.float().norm()):\n", "        if norm < 0:\n",
             ("tests/test_merge.py::test_extract_recovers_a_known_low_rank_change",)),
    Mutation("extract_any_pair", "trainers/merge/extract.py",
             "    _check_same_architecture(old, new)\n", "",
             ("tests/test_merge.py::test_extract_refuses_checkpoints_of_different_architectures",)),
    Mutation("peft_suffixes_unread", "trainers/merge/adapter_file.py",
             '_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",\n',
             '_SUFFIXES = {"lora_A.weight": "lora_up.weight", "lora_B.weight": "lora_down.weight",\n',
             ("tests/test_merge.py::test_adapters_in_peft_and_comfyui_key_formats_read_as_the_kohya_file",)),
    Mutation("foreign_adapter_modules_skipped", "trainers/merge/adapter_file.py",
             "    if foreign:\n", "    if False:\n",
             ("tests/test_merge.py::test_an_adapter_for_another_model_is_refused_with_what_it_is",)),
    Mutation("bake_without_cancel_check", "trainers/merge/bake.py",
             "            host.check_interrupt()  # Cancel: the temp file is removed, nothing is published\n", "",
             ("tests/test_merge.py::test_cancel_during_a_bake_leaves_no_file",)),
    Mutation("run_folder_any_path", "nodes/routes.py",
             "    return path if os.path.dirname(path) == root and os.path.isdir(path) else None\n",
             "    return path if os.path.isdir(path) else None\n",
             ("tests/test_live_events.py::test_a_run_folder_linked_from_elsewhere_is_refused",
              "tests/test_live_events.py::test_the_run_routes_refuse_names_that_are_not_a_run_folder")),
    Mutation("live_events_not_sent", "trainers/training/loop.py",
             "                live.step(step, loss_value, lr, sample)\n", "                pass\n",
             ("tests/test_live_events.py::test_a_run_sends_one_small_event_per_step_and_its_validation_images",)),
    Mutation("websocket_ping_unanswered", "trainers/graph/websocket.py",
             "                self.send(payload, PONG)\n", "                pass\n",
             ("tests/test_run_workflow.py::"
              "test_websocket_reads_fragmented_long_and_binary_messages_and_answers_pings",)),
    Mutation("set_input_first_of_many", "trainers/graph/client.py",
             "    if len(found) > 1:\n", "    if False:\n",
             ("tests/test_run_workflow.py::test_bad_assignments_say_what_to_write",)),
    Mutation("upload_overrides_links", "trainers/graph/client.py",
             'if isinstance(node["inputs"].get(name), str) and node["inputs"][name]:',
             'if not isinstance(node["inputs"].get(name), int):',
             ("tests/test_run_workflow.py::test_upload_points_only_the_typed_photo_folders_of_our_nodes",)),
    Mutation("client_error_exits_0", "trainers/cli/run_workflow.py",
             '        print(f"error: {e}", file=sys.stderr)\n        return 1\n',
             '        print(f"error: {e}", file=sys.stderr)\n        return 0\n',
             ("tests/test_run_workflow.py::test_run_workflow_uploads_sets_follows_and_downloads",)),
    Mutation("api_forms_drift_unnoticed", "tools/export_workflows.py",
             "        if current != api_text(path, info):\n", "        if current is None:\n",
             ("tests/test_workflows.py::test_drift_is_reported",)),
    Mutation("frozen_models_never_freed", "trainers/training/loop.py",
             "    release = components is None and not cfg.validation_prompt and not method.export_reads_frozen_models\n",
             "    release = False\n",
             ("tests/test_train_lora.py::test_a_run_that_loaded_its_base_frees_the_frozen_models_once_cached",)),
    Mutation("frozen_models_freed_for_checkpoints", "trainers/training/loop.py",
             "    release = components is None and not cfg.validation_prompt and not method.export_reads_frozen_models\n",
             "    release = components is None and not cfg.validation_prompt\n",
             ("tests/test_train_lora.py::test_a_run_that_loaded_its_base_frees_the_frozen_models_once_cached",)),
    Mutation("base_loaded_whole_before_captions", "trainers/training/loop.py",
             "    return load_sd_components(path, text_first=True)\n", "    return load_sd_components(path)\n",
             ("tests/test_train_lora.py::test_a_run_loads_its_base_text_first_and_reads_the_unet_after_the_captions",)),
    Mutation("vae_swap_reads_the_base_early", "trainers/families/components.py",
             "        if self.load_rest is None:\n            self.vae = make(self.vae)\n",
             "        if True:\n            self.vae = make(self.vae)\n",
             ("tests/test_sdxl.py::test_a_text_first_load_reads_the_unet_and_vae_on_first_use_as_the_same_model",)),
    Mutation("text_first_unet_layout_unchecked", "trainers/families/single_file.py",
             "    shapes_only = any(value.is_meta for value in matched.values())\n",
             "    shapes_only = any(value.is_meta for value in matched.values())\n    if shapes_only:\n"
             "        return None\n",
             ("tests/test_sdxl.py::test_a_text_first_load_checks_the_unet_layout_before_reading_it",)),
    Mutation("half_queued_graph_left_running", "trainers/graph/client.py",
             '            self.cancel(parsed.get("prompt_id"))\n', "",
             ("tests/test_run_workflow.py::test_run_workflow_uploads_sets_follows_and_downloads",)),
]


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout
    return [f for f in out.decode("utf-8", "surrogateescape").split("\0") if f]


def scratch_copy(files: list[str]) -> str:
    """The repository's files (not .venv, caches or outputs) in a new temp folder."""
    root = tempfile.mkdtemp(prefix="personalize_mutation_")
    for rel in files:
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):  # deleted but still tracked
            continue
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    return root


def apply(root: str, m: Mutation) -> str | None:
    """Apply `m` in the copy at `root`; the reason it cannot be applied, or None."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return f"{m.file} does not exist"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(m.original)
    if count != 1:
        return f"original text found {count} times in {m.file} (must be exactly once)"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(m.original, m.replacement))
    return None


def run_tests(root: str, tests, timeout: float) -> tuple[int | None, str]:
    """pytest's exit code in the copy (None on timeout) and the tail of its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "PYTHONPATH")}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        return None, (out.decode("utf-8", "replace") if isinstance(out, bytes) else out)[-2000:]
    return proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def verdict(code: int | None) -> str:
    return {0: "MISSED", 1: "caught", None: "TIMEOUT"}.get(code, f"ERROR (pytest exit {code})")


def check(m: Mutation, files: list[str], timeout: float, verbose: bool) -> tuple[str, float]:
    root = scratch_copy(files)
    start = time.time()
    try:
        problem = apply(root, m)
        if problem:
            return f"NOT APPLIED: {problem}", 0.0
        code, tail = run_tests(root, m.tests, timeout)
        result = verdict(code)
        if verbose or result != "caught":
            print(f"--- {m.name}: {result}\n{tail}", file=sys.stderr)
        return result, time.time() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)


def baseline(selected: list[Mutation], files: list[str], timeout: float) -> bool:
    """Every selected mutation's tests pass on the unmutated code (else 'caught' would mean nothing)."""
    tests = sorted({t for m in selected for t in m.tests})
    root = scratch_copy(files)
    try:
        start = time.time()
        code, tail = run_tests(root, tests, timeout * 2)
        print(f"baseline: {len(tests)} test target(s) {'pass' if code == 0 else 'FAIL'} "
              f"({time.time() - start:.0f} s)", flush=True)
        if code != 0:
            print(tail, file=sys.stderr)
        return code == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutation (default 600)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's output for caught ones too")
    args = p.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("error: two mutations share a name", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"error: no mutation named {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name}  ({m.file})\n    " + "\n    ".join(m.tests))
        return 0
    files = repo_files()
    if not args.no_baseline and not baseline(selected, files, args.timeout):
        print("error: the tests fail without any mutation; fix them first", file=sys.stderr)
        return 2
    rows = []
    for m in selected:
        result, seconds = check(m, files, args.timeout, args.verbose)
        rows.append((m.name, result, seconds))
        print(f"{m.name:<{max(map(len, names))}} | {result} | {seconds:.1f}", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}} | result | seconds")
    for name, result, seconds in rows:
        print(f"{name:<{width}} | {result} | {seconds:.1f}")
    bad = [name for name, result, _ in rows if result != "caught"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
