"""The mutants of ``make mutation``: one textual change each, in the training path.

Each :class:`Mutant` replaces one exact piece of text in one file of a temporary copy of the
repository (it must occur exactly once there, or the run is a harness error: a mutant that no
longer applies is never counted as caught). Each breaks one guarantee that
:mod:`fastdp_jax` states, silently: the code runs, trains and reports the same sigma, C, q and
epsilon, and only a test that checks what the loop does can tell.

``tests/mutation/test_mutants_apply.py`` checks in the ordinary suite that every mutant still
applies to the current sources, so a refactoring that moves the text is noticed at once.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mutant:
  """One deliberate bug.

  Attributes:
    name: short identifier (``--only NAME``).
    file: the mutated file, relative to the repository root.
    old: the exact text replaced (must occur exactly once in ``file``).
    new: its replacement.
    breaks: the guarantee the change breaks, in words (for the table).
    multidevice: True when the change is invisible on one device (only the 8-device run can
      catch it).
    tests: the tests that must catch it ON THEIR OWN, run instead of the privacy tests (the
      canary audit's own mutant: the loop tests would catch it first).
  """

  name: str
  file: str
  old: str
  new: str
  breaks: str
  multidevice: bool = False
  tests: tuple[str, ...] = ()


_CLIP_FACTOR = "factor = jnp.minimum(1.0, l2_norm_clip / jnp.where(norms > 0, norms, 1.0))"
_VMAP_CLIP_ARG = "      loss_fn, l2_clip_norm=l2_norm_clip,"
_BUILD_STEP = "  build = build_streamed_chunk if streamed else build_train_chunk\n"
_NOISE_STDDEV = "  stddev = float(noise_multiplier) * float(l2_norm_clip)\n"
_VMAP_SUM = "  summed, aux = clipped_sum(params, batch, is_padding_example=~mask)\n"
_TABLE_SCALE = ("      scaled = _rows(keep, g) * factor[:, None].astype(g.dtype)\n"
                "      # Padding rows add exact zeros")
_UNIT_TESTS = "tests/test_units_training.py"
_UNIT_CLIPPING = "tests/dp/test_unit_clipping.py"  # the unit clipping on its own
_WITH_KEY = "lambda s: s._replace(key=jnp.asarray(key, s.key.dtype).reshape(s.key.shape)))"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="sigma_half",
        file="fastdp_jax/dp/noise.py",
        old=_NOISE_STDDEV,
        new="  stddev = 0.5 * float(noise_multiplier) * float(l2_norm_clip)  # MUTANT\n",
        breaks="the loop adds noise of std sigma C / 2 while sigma is reported"),
    Mutant(
        name="clip_10c_ghost",
        file="fastdp_jax/dp/ghost.py",
        old=_CLIP_FACTOR,
        new=_CLIP_FACTOR.replace("l2_norm_clip /", "10 * l2_norm_clip /") + "  # MUTANT",
        breaks="ghost clipping (dp.clipping 'auto' for the MLP) clips at 10 C; noise for C"),
    Mutant(  # the vmap path clips inside jax_privacy.clipped_grad: mutate our call of it
        name="clip_10c_vmap",
        file="fastdp_jax/dp/clipping.py",
        old=_VMAP_CLIP_ARG,
        new=_VMAP_CLIP_ARG.replace("=l2_norm_clip", "=10 * l2_norm_clip") + "  # MUTANT",
        breaks="vmap clipping clips at 10 C; noise for C"),
    Mutant(
        name="no_clipping_ghost",
        file="fastdp_jax/dp/ghost.py",
        old=_CLIP_FACTOR,
        new="factor = jnp.ones_like(norms)  # MUTANT: no clipping",
        breaks="ghost path: per-example gradients are not clipped at all"),
    Mutant(
        name="no_clipping_vmap",
        file="fastdp_jax/dp/clipping.py",
        old=_VMAP_CLIP_ARG,
        new=_VMAP_CLIP_ARG.replace("=l2_norm_clip", "=jnp.inf") + "  # MUTANT: no clipping",
        breaks="vmap path: per-example gradients are not clipped at all"),
    Mutant(
        name="realised_batch",
        file="fastdp_jax/step.py",
        # Wraps the clipped sum where the step is built from it, not where it is made: the
        # text does not depend on the module that makes it.
        old=_BUILD_STEP,
        new=("  _exact_sum = clipped_sum\n"
             "\n"
             "  def clipped_sum(params, batch, mask):  # MUTANT: mean over the realised batch\n"
             "    grads, stats = _exact_sum(params, batch, mask)\n"
             "    scale = 64.0 / jnp.maximum(jnp.sum(mask), 1)  # configs/test.py's batch\n"
             "    return jax.tree_util.tree_map(lambda g: g * scale, grads), stats\n"
             "\n" + _BUILD_STEP),
        breaks="the clipped sum is divided by the realised batch size, not the expected one"),
    Mutant(
        name="noise_key_reuse",
        file="fastdp_jax/dp/noise.py",
        old="return updates, PrivatizeState(key=state.key, count=state.count + 1)",
        new="return updates, PrivatizeState(key=state.key, count=state.count)  # MUTANT",
        breaks="the noise count is never advanced: every update (and call) reuses one noise"),
    Mutant(
        name="correlated_sampling",
        file="fastdp_jax/dp/sampling.py",
        old=("    lo, hi = np.searchsorted(self.block_t, [step, step + 1])\n"
             "    return self.block_rows[lo:hi]\n"),
        new=("    lo, hi = np.searchsorted(self.block_t, [step, step + 1])\n"
             "    # MUTANT: the Poisson batch size, but the batch is one contiguous cyclic window\n"
             "    # of rows at a uniformly random start: every row is still in with probability\n"
             "    # q, yet neighbouring rows are included together.\n"
             "    n = len(self.rows)\n"
             "    u = uniforms(self.key, np.array([2**63 + self.lo], np.uint64), np.array([step]))\n"
             "    start = int(u[0] * n) % n\n"
             "    return np.sort((start + np.arange(hi - lo)) % n)\n"),
        breaks="inclusions are perfectly correlated between neighbouring rows (right rate q)"),
    Mutant(
        name="noise_per_device",
        file="fastdp_jax/step.py",
        old="    state, m = update(state, active, lambda p: sharded_sum(p, x, y, idx, mask))\n",
        new=("    # MUTANT: every device noises its own clipped sum before the all-reduce, and the\n"
             "    # noised sums are added: D devices sharing the key add D times the noise (on\n"
             "    # one device, the same as adding it once).\n"
             "    def local(params, opt_state, x, y, idx, mask):\n"
             "      grads, m = per_device(params, x, y, idx[0], mask[0])\n"
             "      updates, opt_state = tx.update(grads, opt_state, params)\n"
             "      return jax.lax.psum(updates, AXIS), opt_state, jax.lax.psum(m, AXIS)\n"
             "\n"
             "    updates, opt_state, m = jax.shard_map(\n"
             "        local, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),\n"
             "        out_specs=(P(), P(), P()), check_vma=False)(\n"
             "            state.params, state.opt_state, x, y, idx, mask)\n"
             "    params = optax.apply_updates(state.params, updates)\n"
             "    m = dict(m, params_finite=jnp.all(jnp.stack(\n"
             "        [jnp.all(jnp.isfinite(q)) for q in jax.tree_util.tree_leaves(params)])))\n"
             "    state = State(params=params, opt_state=opt_state, step=state.step + 1)\n"),
        breaks="noise is added on each of the D devices before the all-reduce, not once",
        multidevice=True),
    Mutant(
        name="public_sampling_seed",
        file="fastdp_jax/dp/keys.py",
        # Only the secret key is replaced: a set dp.sampling_seed still fixes the batches (a
        # reproducibility run behaves as without the mutant), but a default run's "secret"
        # sampling key is a public constant, and the run still says private.
        old="  skey, sfixed = sampling.sampling_key(sampling_seed)\n",
        new=("  skey, sfixed = sampling.sampling_key(sampling_seed)\n"
             "  if not sfixed:  # MUTANT: the secret sampling key is a public constant\n"
             "    skey = sampling.sampling_key(0)[0]\n"),
        breaks="a default run's sampler is keyed by a public constant; it still says private"),
    Mutant(
        name="segment_key_reuse",
        file="fastdp_jax/dp/keys.py",
        old="  keys = fresh_noise(keys)\n  if streamed:\n    return keys\n",
        new="  keys = fresh_noise(keys)\n  if True:  # MUTANT: the new segment keeps the old batches' key\n    return keys\n",
        breaks="a resume with changed settings keeps the sampling key: the segments the "
               "ledger composes as independent share their batches"),
    Mutant(
        name="calibration_budget_not_reserved",
        file="fastdp_jax/dp/calibration.py",
        old="    out[name] = value - calibration_epsilon\n",
        new="    out[name] = value  # MUTANT: training spends the calibration's share too\n",
        breaks="training is calibrated to the whole target, so training plus the temperature's "
               "selection exceed the epsilon the user asked for"),
    Mutant(
        name="clip_101c_ghost",
        file="fastdp_jax/dp/ghost.py",
        old=_CLIP_FACTOR,
        new=_CLIP_FACTOR.replace("l2_norm_clip /", "1.01 * l2_norm_clip /") + "  # MUTANT",
        breaks="ghost clipping clips at 1.01 C (1 % more signal than the noise is for)"),
    Mutant(
        name="pair_clipping_vmap",
        file="fastdp_jax/dp/clipping.py",
        old=_VMAP_SUM,
        new=("  # MUTANT: examples clipped in pairs: the sum of two examples' gradients is clipped\n"
             "  # to C as if it were one example's (sensitivity 2 C for the noise of C).\n"
             "  pad = mask.shape[0] % 2\n"
             "  ext = lambda v: jnp.concatenate([v, v[:pad]]) if pad else v\n"
             "  pairs = jax.tree_util.tree_map(lambda v: ext(v).reshape((-1, 2) + v.shape[1:]),\n"
             "                                 batch)\n"
             "  pmask = jnp.concatenate([mask, jnp.zeros(pad, bool)]).reshape(-1, 2)\n"
             "\n"
             "  def pair_loss(p, pair):\n"
             "    ex, m = pair\n"
             "    return sum(jnp.where(m[k], loss_fn(p, jax.tree_util.tree_map(lambda v: v[k], ex)),\n"
             "                         0.0) for k in (0, 1))\n"
             "\n"
             "  summed, pair_aux = jp_clipping.clipped_grad(\n"
             "      pair_loss, l2_clip_norm=l2_norm_clip, batch_argnums=1, keep_batch_dim=False,\n"
             "      return_grad_norms=True)(params, (pairs, pmask),\n"
             "                              is_padding_example=~pmask.any(axis=1))\n"
             "  aux = type('Aux', (), {'grad_norms': jnp.repeat(pair_aux.grad_norms, 2)[:mask.shape[0]]})\n"),
        breaks="vmap path: pairs of examples are clipped together (their summed gradient to C): "
               "one example can move the sum by 2 C"),
    Mutant(
        name="unclipped_embedding_rows_ghost",
        file="fastdp_jax/dp/ghost.py",
        old=_TABLE_SCALE,
        new=_TABLE_SCALE.replace(" * factor[:, None].astype(g.dtype)",
                                 "  # MUTANT: table rows not clipped"),
        breaks="ghost path: the embedding tables' rows get each example's unclipped gradient "
               "(the dense layers are clipped)"),
    Mutant(
        name="noise_counter_reset_on_resume",
        file="fastdp_jax/dp/noise.py",
        old=_WITH_KEY,
        new=_WITH_KEY[:-2] + ",\n                                    count=jnp.zeros_like(s.count)))"
            "  # MUTANT: a resume restarts the noise counter",
        breaks="a resume restarts the noise counter: the updates after it reuse the noise of the "
               "first ones (the same noise twice)"),
    Mutant(
        name="audit_sigma_quarter",
        file="fastdp_jax/dp/noise.py",
        old=_NOISE_STDDEV,
        new="  stddev = 0.25 * float(noise_multiplier) * float(l2_norm_clip)  # MUTANT\n",
        breaks="the loop adds noise of std sigma C / 4; the canary audit alone must see it "
               "(its lower bound above the accountant's epsilon)",
        tests=("tests/dp/test_privacy_eval.py::test_canary_audit_with_the_power_to_see_a_"
               "quarter_of_the_noise_stays_below_the_accountant",)),
    Mutant(
        name="n_published",
        file="fastdp_jax/dp/count.py",
        old="  words = np.concatenate([np.array([estimate], np.int64).view(np.uint32),",
        new="  words = np.concatenate([np.array([num_examples], np.int64).view(np.uint32),"
            "  # MUTANT",
        breaks="the run plans q, T and delta from the exact N while the card says a DP estimate: "
               "model/ publishes N",
        tests=("tests/export/test_export_scan.py",)),
    # The privacy unit: user-level sampling with a clipped sum per unit.
    Mutant(
        name="unit_rows_clipped_ghost",
        file="fastdp_jax/dp/ghost.py",
        old="  row_factor = _clip_factor(norms, finite, l2_norm_clip)[rows.unit]\n",
        new=("  row_factor = _clip_factor(jnp.sqrt(_row_sq_norms(params, inputs, out_grads, "
             "row_grads)), row_keep, l2_norm_clip)  # MUTANT\n"),
        breaks="the ghost path clips each ROW of a unit to C instead of the unit's summed "
               "gradient: one unit of k rows moves the sum by up to k C",
        tests=(_UNIT_CLIPPING + "::test_a_units_rows_together_contribute_at_most_c_where_rows_"
               "alone_give_k_c",
               _UNIT_TESTS + "::test_a_unit_of_k_rows_never_moves_the_clipped_sum_by_more_than_c")),
    Mutant(
        name="unit_band_own_block_only",
        file="fastdp_jax/dp/ghost.py",
        old="  weights = (jnp.where(q == p, 1.0, jnp.where(q > p, 2.0, 0.0)), jnp.where(q < p, 2.0, 0.0))\n",
        new=("  weights = (jnp.where(q == p, 1.0, jnp.where(q > p, 2.0, 0.0)), 0.0 * q)"
             "  # MUTANT\n"),
        breaks="the ghost unit norm misses the pairs of a unit that straddles two blocks of k "
               "slots: its norm comes out too small and the clipped unit exceeds C",
        tests=(_UNIT_CLIPPING + "::test_ghost_equals_vmap_equals_unit_by_unit",)),
    Mutant(
        name="unit_one_output_layer_by_row",
        file="fastdp_jax/dp/ghost.py",
        old="  total = jax.ops.segment_sum(v, rows.unit, num_segments=n, indices_are_sorted=True)\n",
        new=("  total = jax.ops.segment_sum(v, jnp.arange(n), num_segments=n)  # MUTANT: by row\n"),
        breaks="the ghost unit norm of a one-output layer (the logit) adds its rows' squared "
               "norms instead of squaring their sum: a unit whose rows agree comes out too "
               "small and the clipped unit exceeds C",
        tests=(_UNIT_CLIPPING + "::test_ghost_equals_vmap_equals_unit_by_unit",)),
    Mutant(
        name="temperature_units_dropped",
        file="fastdp_jax/dp/calibration.py",
        old="  utility = -scores(logits, labels, temperatures, units) * epsilon / SENSITIVITY\n",
        new=("  utility = -scores(logits, labels, temperatures) * epsilon / SENSITIVITY"
             "  # MUTANT\n"),
        breaks="the temperature's selection scores a unit dataset's validation rows one by one "
               "at one row's sensitivity: one household of k rows moves the score by up to k L",
        tests=("tests/dp/test_calibration.py::test_the_selection_is_the_exponential_mechanism",)),
    Mutant(
        name="validation_unit_rows_summed",
        file="fastdp_jax/data/units.py",
        old="  return 1.0 / counts[inverse.ravel()]\n",
        new="  return np.ones(len(inverse.ravel()))  # MUTANT: a unit's rows summed\n",
        breaks="the temperature's and fastdp-tune's scores sum a validation unit's rows while "
               "their mechanisms assume one row's sensitivity per unit: one household of k rows "
               "moves them by up to k times that",
        tests=(_UNIT_TESTS + "::test_one_whole_validation_unit_moves_every_temperature_score_by_"
               "at_most_l",
               "tests/test_tune.py::test_a_unit_datasets_score_weighs_each_unit_as_one_row")),
    Mutant(
        name="unit_rows_clipped_vmap",
        file="fastdp_jax/dp/clipping.py",
        old=("  units = rows.unit  # row r's gradient joins its unit's sum: never clipped "
             "alone\n"),
        new="  units = jnp.arange(n)  # MUTANT: every row its own unit, clipped alone\n",
        breaks="the vmap path clips each ROW of a unit to C instead of the unit's summed "
               "gradient: one unit of k rows moves the sum by up to k C",
        tests=(_UNIT_CLIPPING + "::test_a_units_rows_together_contribute_at_most_c_where_rows_"
               "alone_give_k_c",
               _UNIT_TESTS + "::test_a_unit_of_k_rows_never_moves_the_clipped_sum_by_more_than_c")),
    Mutant(
        name="unit_rows_sampled",
        file="fastdp_jax/unit_batches.py",
        old="  sizes = np.where(units.mask, layout.sizes[g], 0)\n",
        new=("  sizes = np.where(units.mask, layout.sizes[g], 0)  # MUTANT\n"
             "  sizes = np.random.default_rng().binomial(sizes, 0.5)\n"),
        breaks="a sampled unit's rows are each included with their own coin (rows sampled, "
               "not units): the accountant's q is no longer the unit's",
        tests=(_UNIT_TESTS + "::test_each_unit_slot_holds_all_kept_rows_of_one_unit_and_no_other",)),
    Mutant(
        name="unit_q_from_rows",
        file="fastdp_jax/inputs.py",
        old=("    train, test, dev, validation = _load_units(d, mesh, rc.json, unit)\n"
             "    n = dev.num_examples\n"),
        new=("    train, test, dev, validation = _load_units(d, mesh, rc.json, unit)\n"
             "    n = len(train.labels)  # MUTANT: N counts rows\n"),
        breaks="q, T and delta are planned from the number of ROWS while units are sampled: "
               "the stated epsilon is not the units'",
        tests=(_UNIT_TESTS + "::test_q_n_delta_and_epsilon_count_units",)),
    Mutant(
        name="unit_bound_not_in_layout",
        file="fastdp_jax/data/units.py",
        old="  order = perm[keep]\n",
        new="  order = perm  # MUTANT: the rows beyond k stay in the grouped order\n",
        breaks="the bound k is not applied to the rows kept (only to the unit offsets): unit "
               "slots read rows of the neighbouring unit, so one unit moves two clipped sums",
        tests=(_UNIT_TESTS + "::test_each_unit_slot_holds_all_kept_rows_of_one_unit_and_no_other",)),
    Mutant(
        name="unit_split_by_row",
        file="preprocessing/output.py",
        old=("      keys, test = units_lib.key_and_split(uids.tolist(), self.split_seed, "
             "self.test_fraction,\n"),
        new=("      test = split_lib.is_test_row(ids, seed=self.split_seed, "
             "test_fraction=self.test_fraction)  # MUTANT\n"
             "      keys, _ = units_lib.key_and_split(uids.tolist(), self.split_seed, "
             "self.test_fraction,\n"),
        breaks="the producer splits a unit dataset by row: a household's rows land in both "
               "training and test",
        tests=("tests/preprocessing/test_units_pipeline.py",)),
    Mutant(
        name="row_split_by_position",
        file="preprocessing/output.py",
        old=("      test = split_lib.is_test_row(rkeys, seed=self.split_seed, "
             "test_fraction=self.test_fraction)\n"),
        new=("      test = split_lib.is_test_row(ids, seed=self.split_seed, "
             "test_fraction=self.test_fraction)  # MUTANT\n"),
        breaks="the producer splits a row-level dataset by row position: removing one input "
               "line moves about a third of the rows after it to the other split",
        tests=("tests/preprocessing/test_row_split.py",)),
    Mutant(
        name="validation_by_row_number",
        file="fastdp_jax/inputs.py",
        old="  keys = _train_row_keys(path) if path is not None else None\n",
        new="  keys = None  # MUTANT: the validation rows by row number\n",
        breaks="the validation rows are chosen by row number: removing one training row moves "
               "about a third of the rows after it between training and validation",
        tests=("tests/test_tasks.py::test_removing_one_training_row_moves_no_other_between_"
               "training_and_validation",)),
)


def by_name(names: list[str] | None = None) -> list[Mutant]:
  """The mutants called ``names`` (all of them for None), in the order of :data:`MUTANTS`."""
  if not names:
    return list(MUTANTS)
  known = {m.name: m for m in MUTANTS}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown mutants {unknown}; known: {sorted(known)}")
  return [m for m in MUTANTS if m.name in names]
