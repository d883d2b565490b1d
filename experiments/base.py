"""Defaults shared by every experiment: the reference's hyper-parameters (spec §3.2, §3.3, §5).

Each experiment file (`brats.py`, `mslub.py`, `atlas.py`, `wmh.py`, `demo.py`) calls
`base_config()` and sets what differs. Every config has a tiny variant for CPU smoke runs:
`--config=experiments/brats.py:tiny`.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "patch2loc"
    c.modality = "t2"  # model trained on IXI T2 (BraTS21, MSLUB) or T1 (ATLAS v2, WMH), spec §1
    # What the run trains: "patch2loc", or "dae", the pixel-wise denoising autoencoder that
    # Patch2Loc is fused with (experiments/dae.py, p2l.fusion).
    c.method = "patch2loc"
    c.fold = 0  # IXI split fold 0..4 (spec §1.1; the authors' scripts loop over 5 folds)
    c.seed = 3141  # seed_everything(3141) in the reference (spec §3.3)

    # Paths. Required (p2l.config_check.REQUIRED_PATHS): a run without them stops at once with a
    # message saying what to set.
    c.data_root = ml_collections.FieldReference(None, field_type=str)  # holds Train/ and Test/
    c.splits_dir = ml_collections.FieldReference(None, field_type=str)  # the reference's splits/
    c.tfds_dir = ""  # where the tfds slice builds are cached; "" = <data_root>/../p2l_tfds
    c.test_sets = ("Brats21", "MSLUB")  # lesion sets evaluated (spec §1.2)

    # Data geometry and load-time normalisation (spec §2.2).
    c.data = ml_collections.ConfigDict()
    c.data.image_shape = (192, 192, 100)  # tio.CropOrPad target (H, W, axial slices)
    c.data.expected_spacing = 1.0  # mm; preprocessed volumes are 1 mm isotropic (spec §2.1)
    # Processes normalising scans when a slice build is made (once per dataset, shared by folds
    # and configs: p2l.builds); 0 = one per core, at most 8.
    c.data.build_workers = 0
    # Training slices: "device" keeps the train fold on every accelerator and gathers each step
    # there, "host" streams batches from host memory, "auto" picks (p2l.device_slices.choose).
    c.data.device_slices = "auto"

    # Patch sampling (spec §3.2).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.patch_fraction = 0.125  # patch side int(0.125 * 192) = 24 px
    c.sampling.slices_per_step = 356  # batch_size of the reference datamodule
    c.sampling.num_candidates = 32384  # num_patches_per_batch * 4 = 8096 * 4
    c.sampling.rejection_rate = 0.2  # keep a candidate iff >= 20 % of it is brain (mask == 1)
    # Static-shape buffer for accepted candidates, as a fraction of the candidates (p2l.patches).
    # The reference accepts ~35 % on IXI; overflow is counted and reported, never silent.
    c.sampling.capacity_fraction = 0.6

    c.model = ml_collections.ConfigDict()
    # "auto": "matmul" on CPU (exact matrix-product forms on 2x2/1x1 maps and the fused stem,
    # measured faster on XLA:CPU), "xla" (plain lax.conv) on GPU/TPU, where nothing was measured.
    c.model.conv_impl = "auto"
    c.model.dtype = "float32"  # compute dtype of the training forward (reference: fp32)

    # Precision of float32 products and convolutions on accelerators (no effect on CPU), for
    # training, evaluation and detection: "default" (GPU: TF32 tensor cores; TPU: one bfloat16
    # pass), "high" (GPU: TF32; TPU: 3 bfloat16 passes), "highest" (full float32). "default" is
    # what the reference's own numbers come from on an Ampere+ GPU: its convolutions, nearly all
    # of the network's arithmetic, run in TF32 there (torch.backends.cudnn.allow_tf32 is True by
    # default); only its small MLP heads' matmuls stay float32 (allow_tf32 False for matmuls).
    # It is also JAX's default, so runs started before this key keep their numerics.
    c.matmul_precision = "default"

    c.loss = ml_collections.ConfigDict()
    c.loss.type = "beta_nll"  # beta_nll | stirn | mse (spec §4)
    c.loss.beta = 0.5

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-2  # Adam, constant, no clipping (spec §3.3)

    c.num_steps = 15000  # one optimiser step per epoch x 15,000 epochs (spec §3.3, §8.12)
    c.log_every = 25
    c.eval_every = 100  # validation loss on the IXI val fold (reference: every step)
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.prefetch = 2

    # Heatmaps and evaluation (spec §5, §6).
    c.eval = ml_collections.ConfigDict()
    c.eval.stride = 1  # sliding-window stride; > 1 upsamples bilinearly as the reference
    c.eval.batch_size = 4096  # patches per jitted forward (per device)
    c.eval.dtype = "float32"  # reference: float16 on GPU; "bfloat16" is an option
    c.eval.median_size = 7  # 7x7x7 median filter before brain masking (spec §5.4)
    c.eval.erode_mask_iterations = 0  # pDDPM protocol option, off in the reference (spec §8.15)
    c.eval.min_component_voxels = 0  # pDDPM protocol option, off in the reference
    c.eval.healthy_quantile = 98.0  # unsupervised threshold: q98 of healthy IXI scores (spec §5.6)
    c.eval.variant = "combined"  # combined | error | variance (spec §5.3 and the ablations)
    c.eval.healthy_split = "val"  # healthy IXI volumes for the q98 threshold: val | ixi_test
    # Held-out healthy IXI volumes scored at every stored threshold: the fraction of their brain
    # flagged (false positives, p2l.healthy_fpr); "" = none, "ixi_test" = the IXI test CSV.
    c.eval.healthy_test_split = ""
    # results/uncertainty/: calibration of the variance head on healthy held-out patches and the
    # patch-level analysis of the lesion sets (p2l.uncertainty).
    c.eval.uncertainty_report = False
    c.eval.healthy_postprocess = True  # filter healthy maps like test maps (spec §8.14: no)
    c.eval.max_volumes = 0  # 0 = all volumes of each test set
    c.eval.max_healthy_volumes = 0  # 0 = all healthy volumes of eval.healthy_split
    c.eval.num_figures = 3  # overlay figures of the first volumes of each set
    # Fusion with a pixel-wise detector (p2l.fusion): the folder of a trained DAE run on the same
    # data ("" = Patch2Loc alone). Evaluation then scores Patch2Loc, the DAE and every rule of
    # `fusion` on the same volumes, one row per detector; `fusion_weight` is Patch2Loc's share in
    # the zsum rule.
    c.eval.pixel_workdir = ""
    c.eval.fusion = ("product", "zsum", "gate")
    c.eval.fusion_weight = 0.5
    # The gate rule keeps the residual where Patch2Loc's score is above this quantile of its
    # healthy in-brain scores; 0 = eval.healthy_quantile (the rule as specified).
    c.eval.fusion_gate_quantile = 0.0
    # Host threads post-processing and scoring volumes while the devices compute the next
    # heatmaps (p2l.eval_stream; ~3 volumes per worker in memory); 0 = the CPUs available.
    c.eval.workers = 0
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a real config for CPU smoke runs: same data and geometry, few small steps."""
    c.sampling.slices_per_step = 8
    c.sampling.num_candidates = 768
    c.num_steps = 20
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.eval.stride = 4
    c.eval.batch_size = 1024
    c.eval.max_volumes = 2
    c.eval.max_healthy_volumes = 2
    return c


def paper_config(name: str, modality: str, test_sets: tuple[str, ...], variant: str = ""):
    """One column group of the paper's table: the base config, its test sets and modality."""
    c = base_config()
    c.name = name
    c.modality = modality
    c.test_sets = test_sets
    if variant == "tiny":
        c = tiny(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'tiny')")
    return c


def five_folds():
    """The paper's protocol: 5 IXI folds (spec §1.1, §8.3), one seed. Add seeds for variance."""
    return [{"fold": fold, "seed": 3141} for fold in range(5)]
