"""PPO's loop for rl_tune.py --method ppo: rollouts, rewards, several optimisation epochs per batch, checkpoints.

Written here because no maintained library offers PPO for transformers 5 (TRL 1.16 ships none, not even in
trl.experimental). The equations are in proxytune.preference.ppo; this module only runs them:

    for each step (one rollout batch of B prompts):
        sample a completion per prompt from the policy (pure sampling at --temperature, cut to the prompt's drawn
            completion length or at EOS); score it with the reward functions (weighted sum)
        log pi_old, V_old (policy + value head) and log pi_ref (frozen reference) of every completion token
        per-token rewards with the KL penalty, GAE advantages and returns
        --num_ppo_epochs times, over --num_mini_batches shuffled minibatches: clipped policy + value loss, one
            AdamW step (gradients clipped to --max_grad_norm)
        update the KL coefficient (adaptive controller); log; every --save_steps write checkpoint-N atomically

The value head is a linear layer on the policy's last hidden state (trl 0.x's AutoModelForCausalLMWithValueHead:
one trunk, two heads), zero-initialised so V starts at 0. With LoRA the reference is the policy with its adapter
switched off; otherwise a frozen copy of the starting model. Dropout stays off (model.eval()) so that pi_old and
pi_theta are the same function of the weights. A step's sampling and minibatch order are seeded from --seed and the
step, so a run resumed from checkpoint-N reproduces the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import atomic_directory, write_json
from proxytune.foundation.progress import progress_bar
from proxytune.preference.ppo import (
    AdaptiveKLController,
    gae_advantages,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from proxytune.training.checkpoints import list_checkpoints, reload_weights

logger = logging.getLogger(__name__)


VALUE_HEAD = "value_head.safetensors"


PPO_STATE = "ppo_state.json"


class PPOTrainer:
    """Trainer-like (`.model`, `.state`, `.train(resume_from_checkpoint)`), so rl_tune.py saves its final/ as the
    other methods'. `rows`: {prompt, [completion_length], <columns the rewards read>}; `rewards`: reward functions of
    TRL's signature; `weights`: one per function."""

    def __init__(self, model, tokenizer, args, rows: list[dict], rewards: list, weights: list[float]):
        import torch
        from transformers import TrainerState, get_scheduler

        if args.world_size > 1:
            raise UsageError(f"--method ppo runs in one process ({args.world_size} were launched); run it with python, "
                             "or use --method rloo (TRL) under torchrun/accelerate")
        self.args, self.tokenizer, self.rows = args, tokenizer, rows
        self.rewards, self.weights = rewards, weights
        self.device = args.device
        self.model = model.to(self.device)
        self.model.eval()  # no dropout: the ratio compares one deterministic function at two weight settings
        self.is_peft = hasattr(model, "peft_config")
        if self.is_peft:
            self.ref_model = None  # model.disable_adapter() is the reference
        else:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        hidden = model.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.vocab = len(tokenizer)
        rows_per_epoch = math.ceil(len(rows) / args.per_device_train_batch_size)
        self.total_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(
            args.num_train_epochs * rows_per_epoch))
        params = [p for p in model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(self.total_steps),
                                       num_training_steps=self.total_steps)
        self.kl_ctl = AdaptiveKLController(args.init_kl_coef, args.target_kl, args.kl_horizon, args.adaptive_kl)
        self.state = TrainerState()
        self.state.max_steps = self.total_steps
        names = [getattr(f, "__name__", type(f).__name__) for f in rewards]
        self.reward_names = names

    # --- scoring ----------------------------------------------------------------------------------------------
    def _forward(self, model, ids, attention_mask, prompt_width: int, with_values: bool):
        """log pi of each completion token (B, T) and, with_values, V of the state before it (B, T)."""
        import torch

        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each text
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=with_values, use_cache=False)
        # the logit at position i predicts token i + 1; Pythia's rows past the tokenizer are never sampled (below)
        logits = out.logits[:, prompt_width - 1:-1, :self.vocab].float() / self.args.temperature  # (B, T, V)
        targets = ids[:, prompt_width:]  # (B, T)
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
        values = None
        if with_values:
            hidden = out.hidden_states[-1][:, prompt_width - 1:-1]  # (B, T, H)
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, T)
        return logprobs, values

    def _reference_logprobs(self, ids, attention_mask, prompt_width: int):
        if self.ref_model is not None:
            return self._forward(self.ref_model, ids, attention_mask, prompt_width, False)[0]
        with self.model.disable_adapter():
            return self._forward(self.model, ids, attention_mask, prompt_width, False)[0]

    # --- one rollout batch ------------------------------------------------------------------------------------
    def rollout(self, rows: list[dict], step: int) -> dict:
        """Sample, score and compute advantages for `rows`; everything the PPO epochs need, as tensors."""
        import torch

        args, tok = self.args, self.tokenizer
        torch.manual_seed(args.seed + step)
        enc = tok([r["prompt"] for r in rows], add_special_tokens=False, padding=True, padding_side="left",
                  return_tensors="pt").to(self.device)
        limits = torch.tensor([r.get("completion_length") or args.max_completion_length for r in rows],
                              device=self.device)  # (B,)
        vocab_rows = self.model.get_output_embeddings().weight.shape[0]
        with torch.no_grad():
            generated = self.model.generate(
                **enc, do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature,
                max_new_tokens=int(limits.max()), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                suppress_tokens=list(range(self.vocab, vocab_rows)) or None)
        prompt_width = enc["input_ids"].shape[1]
        completion = generated[:, prompt_width:]  # (B, T)
        t = torch.arange(completion.shape[1], device=self.device)
        is_eos = completion == tok.eos_token_id
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])  # (B,)
        mask = ((t[None] < limits[:, None]) & (t[None] <= first_eos[:, None])).long()  # (B, T)
        width = int(mask.sum(1).max())
        completion, mask = completion[:, :width], mask[:, :width]
        completion = torch.where(mask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
        ids = torch.cat([enc["input_ids"], completion], 1)  # (B, P + T)
        attention = torch.cat([enc["attention_mask"], mask], 1)

        completion_ids = [c[m.bool()].tolist() for c, m in zip(completion, mask)]
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        per_function = []
        for function in self.rewards:
            values = function(prompts=prompts, completions=texts, completion_ids=completion_ids, **columns)
            per_function.append(torch.tensor(values, dtype=torch.float32, device=self.device))
        scores = sum(w * r for w, r in zip(self.weights, per_function))  # (B,)

        with torch.no_grad():
            logprobs, values = self._forward(self.model, ids, attention, prompt_width, True)
            ref_logprobs = self._reference_logprobs(ids, attention, prompt_width)
        mask_f = mask.float()
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask_f, self.kl_ctl.value)
        advantages, returns = gae_advantages(rewards, values, mask_f, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask_f)
        return {"ids": ids, "attention": attention, "prompt_width": prompt_width, "mask": mask_f,
                "logprobs": logprobs, "values": values * mask_f, "advantages": advantages, "returns": returns,
                "scores": scores, "per_function": per_function, "kl": kl.sum(1), "texts": texts}

    def optimise(self, batch: dict, step: int) -> dict:
        """--num_ppo_epochs passes over the batch in --num_mini_batches minibatches; the mean losses."""
        import torch

        args = self.args
        n = batch["ids"].shape[0]
        generator = torch.Generator().manual_seed(args.seed + step)
        stats = {"policy_loss": [], "value_loss": [], "clip_frac": []}
        for _ in range(args.num_ppo_epochs):
            for index in torch.randperm(n, generator=generator).split(max(1, n // args.num_mini_batches)):
                index = index.to(self.device)
                mask = batch["mask"][index]
                logprobs, values = self._forward(self.model, batch["ids"][index], batch["attention"][index],
                                                 batch["prompt_width"], True)
                pg, clip_frac = policy_loss(logprobs, batch["logprobs"][index], batch["advantages"][index], mask,
                                            args.cliprange)
                vf = value_loss(values, batch["values"][index], batch["returns"][index], mask, args.cliprange_value)
                loss = pg + args.vf_coef * vf
                self.optimizer.zero_grad()
                loss.backward()
                if args.max_grad_norm and args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                self.optimizer.step()
                stats["policy_loss"].append(pg.item())
                stats["value_loss"].append(vf.item())
                stats["clip_frac"].append(clip_frac.item())
        self.scheduler.step()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def batch_rows(self, step: int) -> list[dict]:
        """Step `step`'s prompts: each epoch of the prompts in its own seeded order, cut into batches."""
        size = self.args.per_device_train_batch_size
        per_epoch = math.ceil(len(self.rows) / size)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(self.rows)))
        random.Random(self.args.seed + epoch).shuffle(order)
        return [self.rows[i] for i in order[index * size:(index + 1) * size]]

    # --- the run ----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None):
        args = self.args
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))
            logger.info("resumed from %s (step %d)", resume_from_checkpoint, self.state.global_step)
        start_time = time.time()
        first = self.state.global_step
        save_every = args.save_steps if args.save_steps >= 1 else max(1, math.ceil(args.save_steps * self.total_steps))
        log_every = args.logging_steps if args.logging_steps >= 1 else max(
            1, math.ceil(args.logging_steps * self.total_steps))
        bar = progress_bar(total=self.total_steps, initial=first, desc="PPO", unit="batch")
        for step in range(first, self.total_steps):
            batch = self.rollout(self.batch_rows(step), step)
            losses = self.optimise(batch, step)
            kl = batch["kl"].mean().item()  # per completion, summed over its tokens
            scores = batch["scores"]
            entry = {"step": step + 1,
                     "epoch": (step + 1) / math.ceil(len(self.rows) / args.per_device_train_batch_size),
                     "reward": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
                     "kl": kl, "kl_coef": self.kl_ctl.value, "completion_length": batch["mask"].sum(1).mean().item(),
                     "learning_rate": self.scheduler.get_last_lr()[0], **losses,
                     **{f"rewards/{n}/mean": r.mean().item() for n, r in zip(self.reward_names,
                                                                              batch["per_function"])}}
            self.kl_ctl.update(kl, len(batch["scores"]))
            self.state.global_step = step + 1
            self.state.epoch = entry["epoch"]
            if (step + 1) % log_every == 0 or step + 1 == self.total_steps:
                self.state.log_history.append(entry)
                logger.info("step %d/%d: reward %.4g, kl %.4g (beta %.4g), policy loss %.4g, value loss %.4g",
                            step + 1, self.total_steps, entry["reward"], kl, entry["kl_coef"], losses["policy_loss"],
                            losses["value_loss"])
            if args.should_save and (step + 1) % save_every == 0:
                self._save_checkpoint()
            bar.update(1)
        bar.close()
        runtime = time.time() - start_time
        return SimpleNamespace(metrics={"train_runtime": runtime, "train_steps": self.total_steps - first})

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """checkpoint-N, written into a temporary directory and renamed (proxytune.foundation.outputs): weights (or
        adapter), value head, optimiser, schedule, RNG, KL coefficient, trainer_state.json; then the oldest beyond
        --save_total_limit are removed."""
        import numpy as np
        import torch
        from safetensors.torch import save_file

        out = Path(self.args.output_dir)
        with atomic_directory(out / f"checkpoint-{self.state.global_step}", overwrite=True) as tmp:
            self.model.save_pretrained(tmp)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(tmp / VALUE_HEAD))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
                       tmp / "rng_state.pth")
            write_json(tmp / PPO_STATE, {"kl_coef": self.kl_ctl.value})
            self.state.save_to_json(str(tmp / "trainer_state.json"))
        limit = self.args.save_total_limit
        if limit:
            for old in list_checkpoints(out)[limit:]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import TrainerState

        if self.is_peft:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        else:
            reload_weights(self.model, path)
        self.value_head.load_state_dict(load_file(str(path / VALUE_HEAD)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.kl_ctl.value = json.loads((path / PPO_STATE).read_text(encoding="utf-8"))["kl_coef"]
        self.state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        self.state.max_steps = self.total_steps

