"""Every config field of remem_jax, with its default and what it means.

`configs/remem.py:<dataset>` is this config on a registry dataset; configs/digits.py starts
from it and changes only what differs. Override any field on the command line:

  python -m remem_jax.main --config=configs/remem.py:cifar100 --workdir=/tmp/run \\
      --config.finetune.steps=1000 --config.finetune.keep_steps="(500, 1000)" \\
      --config.distill.student=mobilenet_v2
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The defaults: the ReMem paper's setting on a ViT-B/16 AugReg i21k teacher."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar100"            # a name of remem_jax/data/registry.py; configs/remem.py:<name> sets it
    c.stages = ("finetune_teacher", "distill_student")  # run in order; the stage table: remem_jax/train/stages.py
    c.seed = 0                        # seeds init, data order and dropout
    c.seeds = 1                       # >1: the run repeated with seeds seed, seed+1, ... (DIR/seeds/seed_<s>/); tables give mean and spread
    c.vit_export_formats = ()         # also export every ViT a stage saves (pretrained / kept teachers, WeCoLoRA and TinyMIM students) in these formats (stablehlo, savedmodel, tflite, timm), verified, to <npz name>_export/

    # --- data (remem_jax/data); the data layer has no defaults of its own: these are the only ones ---
    c.data = ml_collections.ConfigDict()
    c.data.image_size = 224           # square input size of teacher and student (paper: 224, as Kornblith et al.)
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir; None = TFDS default
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS manual_dir: hand-downloaded archives (resisc45, retinopathy, imagenet)
    c.data.shuffle_buffer = 10_000    # shuffle buffer of streamed TFDS splits, encoded images (record sources shuffle fully)
    c.data.validation_percent = 0     # 0: eval on the test split; k: train on train[:100-k%], eval on train[100-k%:]
    c.data.eval_examples = ml_collections.FieldReference(None, field_type=int)  # None: every evaluation uses the whole eval split; n: those every eval_every steps use a fixed class-stratified subset of n (kept and final steps: all)
    c.data.few_shot_fraction = ml_collections.FieldReference(None, field_type=float)  # the few-shot subset, read by fewshot_distill only (every other stage trains on the whole train split); None: whole split; f in (0, 1]: class-stratified fraction (>= 1 per class)
    c.data.few_shot_per_class = ml_collections.FieldReference(None, field_type=int)  # None: off; N: N train examples per class (exclusive with few_shot_fraction)
    c.data.few_shot_seed = 12         # seed of the few-shot subset (12: WeCoLoRA's random_state; identical on every host and run)
    c.data.image_folder = ml_collections.FieldReference(None, field_type=str)  # root with train/ and test/ (or val/) class sub-folders
    c.data.imagenet_lt_train_list = ml_collections.FieldReference(None, field_type=str)  # ImageNet_LT_train.txt
    c.data.image_folder_metric = "top1"  # metric of the image_folder dataset: 'top1' or 'mean_per_class'
    c.data.imagenet_lt_eval_list = ml_collections.FieldReference(None, field_type=str)  # ImageNet_LT_val.txt (paper's 20k) or _test.txt
    c.data.imagenet_lt_image_root = ml_collections.FieldReference(None, field_type=str)  # optional extracted ILSVRC2012 root (train/, val/)
    c.data.digits_test_fraction = 0.25  # offline digits: held-out fraction (stratified, fixed seed)
    c.data.digits_source_size = 32    # offline digits: side of the stored images (8x8 upsampled, nearest), resized to image_size
    c.data.digits_split_seed = 0      # offline digits: seed of the fixed train/test split
    c.data.num_parallel_calls = ml_collections.FieldReference(None, field_type=int)  # parallel decode/augment calls; None: tf.data.AUTOTUNE
    c.data.crop_area_min = 0.05       # inception crop: smallest area fraction
    c.data.random_flip = True         # random horizontal flip in training (off for digits)
    c.data.prefetch = 2               # batches prefetched by tf.data
    c.data.skip_bad_images = False    # image_folder: False = an undecodable image stops the run (named); True = skip and count them

    # --- teacher checkpoint (remem_jax/checkpoints.py) ---
    c.teacher = ml_collections.ConfigDict()
    c.teacher.checkpoint = "B_16"     # AugReg name (B_16, B_16-i1k, ...), local or gs:// npz, 'pretrain' (the pretrain_teacher stage's npz), or a timm / Hugging Face ViT: .safetensors/.bin/.pth, its folder, hf-hub:<org>/<repo> (docs/checkpoints.md)
    c.teacher.dtype = "auto"          # teacher compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16
    c.teacher.cache_dir = ml_collections.FieldReference(None, field_type=str)  # local cache of remote checkpoints; None = ~/.cache/remem_jax/checkpoints

    # --- pretrain_teacher stage: trains a ViT from scratch and saves it as an AugReg npz ---
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.variant = "Ti_16"      # ViT variant ({Ti,S,B,L}_{patch}) of the teacher trained from scratch
    c.pretrain.num_layers = ml_collections.FieldReference(None, field_type=int)  # None: the variant's depth; k: a k-block model
    c.pretrain.steps = 1000           # optimizer steps
    c.pretrain.batch_size = 128       # global batch size
    c.pretrain.optimizer = "adam"     # 'adam' (AdamW; ViTs from scratch) or 'sgd' (momentum)
    c.pretrain.lr = 1e-3              # peak learning rate (cosine schedule with linear warmup)
    c.pretrain.weight_decay = 1e-4    # decoupled weight decay
    c.pretrain.warmup_steps = ml_collections.FieldReference(None, field_type=int)  # linear-warmup steps; None: min(500, 10% of steps)
    c.pretrain.momentum = 0.9         # SGD momentum
    c.pretrain.grad_clip_norm = 1.0   # global-norm clip; 0: no clipping
    c.pretrain.dtype = "auto"         # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16
    c.pretrain.remat = False          # rematerialise each ViT block in the backward pass (less memory, ~1 more forward)
    c.pretrain.eval_every = 0         # steps between evaluations (0: only at the end)
    c.pretrain.checkpoint_every = 500  # steps between resume checkpoints (0: only at the end)
    c.pretrain.log_every = 50         # steps between progress lines / summaries

    # --- finetune_teacher stage (ReMem) ---
    c.finetune = ml_collections.ConfigDict()
    c.finetune.settings = ("remem", "vanilla")  # 'remem' uses the fields below; 'vanilla' forces rho 0, alpha = beta = 1
    c.finetune.steps = 10_000         # optimizer steps (paper grid: 500 ... 10000)
    c.finetune.keep_steps = (500, 1000, 3000, 5000, 7000, 10_000)  # teacher checkpoints kept and distilled (each <= steps; steps is always kept)
    c.finetune.batch_size = 512       # global batch size
    c.finetune.accum_steps = 1        # micro-batches per step (gradient accumulation)
    c.finetune.lr = 0.03              # peak learning rate (paper grid 0.005 ... 0.5)
    c.finetune.warmup_steps = ml_collections.FieldReference(None, field_type=int)  # linear-warmup steps; None: min(500, 10% of steps)
    c.finetune.momentum = 0.9         # SGD momentum
    c.finetune.weight_decay = 1e-4    # decoupled weight decay on kernels (not part of the SAM ascent)
    c.finetune.grad_clip_norm = 1.0   # global-norm clip of the (SAM) gradient; 0: no clipping
    c.finetune.sam_rho = 0.5          # SAM radius; 0 = plain fine-tuning (one gradient pass)
    c.finetune.sync_perturbations = False  # True: ascent from the all-reduced gradient; False: per device (m-sharpness)
    c.finetune.mlp_alpha = 0.8        # ReMem MLP branch weight (1 = pretrained model)
    c.finetune.attn_beta = 1.0        # ReMem attention branch weight (1 = pretrained model)
    c.finetune.residual_mode = "two_minus"  # residual factor: 'two_minus' (2 - w) or 'inverse' (1 / w)
    c.finetune.mode = "full"          # full | lora | adapter | head
    c.finetune.lora_rank = 32         # LoRA rank r
    c.finetune.lora_alpha = 32.0      # LoRA scale alpha / r
    c.finetune.lora_targets = "qv"    # LoRA targets: 'qv' (query, value) or 'all' (every linear layer)
    c.finetune.adapter_reduction = 16  # adapter bottleneck = hidden_size / reduction
    c.finetune.dropout = 0.0          # dropout inside the ViT during fine-tuning
    c.finetune.dtype = "auto"         # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU); params stay float32
    c.finetune.remat = False          # rematerialise each ViT block in the backward pass (less memory, ~1 more forward)
    c.finetune.eval_every = 1000      # steps between evaluations (0: only kept steps; kept steps are always evaluated)
    c.finetune.checkpoint_every = 1000  # steps between resume checkpoints (0: only kept steps; kept steps are always saved)
    c.finetune.log_every = 50         # steps between progress lines / summaries

    # --- distill_student stage ---
    c.distill = ml_collections.ConfigDict()
    c.distill.student = "resnet18"    # resnet18 | resnet34 | resnet50 | mobilenet_v2 | efficientnet_v2_b0 | efficientnet_v2_s
    c.distill.method = "kd"           # kd | dist | patient
    c.distill.steps = 20_000          # optimizer steps (paper: 2e4; patient: 2e5)
    c.distill.batch_size = 512        # global batch size
    c.distill.lr = 0.1                # peak learning rate (paper grid KD {0.05, 0.1, 0.5}, DIST {0.5, 0.7, 1.0})
    c.distill.warmup_steps = ml_collections.FieldReference(None, field_type=int)  # linear-warmup steps; None: 5% of steps
    c.distill.momentum = 0.9          # SGD momentum
    c.distill.weight_decay = 1e-4     # decoupled weight decay on kernels
    c.distill.grad_clip_norm = 1.0    # global-norm clip; 0: no clipping
    c.distill.temperature = 1.0       # KD temperature T (paper grid {1, 2, 4})
    c.distill.kd_weight = 0.5         # KD interpolation weight lambda (paper grid {0.1, 0.5, 0.9})
    c.distill.dist_beta = 1.0         # DIST inter-class weight
    c.distill.dist_gamma = 1.0        # DIST intra-class weight
    c.distill.dist_tau = 1.0          # DIST temperature
    c.distill.mixup_alpha = ml_collections.FieldReference(None, field_type=float)  # mixup Beta(alpha, alpha) on the shared input (0: off); None: 0.8 for patient, 0 for kd/dist
    c.distill.scratch_baseline = True  # also train the student from labels only, same schedule
    c.distill.teachers = "all"        # 'all' kept teacher checkpoints, or 'last' of each setting
    c.distill.width_multiplier = 1.0  # MobileNetV2 width multiplier
    c.distill.dtype = "auto"          # student compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)
    c.distill.eval_every = 0          # steps between student evaluations (0: only at the end)
    c.distill.checkpoint_every = 1000  # steps between resume checkpoints (0: only at the end)
    c.distill.log_every = 100         # steps between progress lines / summaries
    c.distill.export_formats = ("stablehlo", "savedmodel", "tflite")  # best student's verified serving exports (remem_jax/export.py); () = none

    # --- fewshot_distill stage (WeCoLoRA, remem_jax/train/wecolora.py): shallow ViT students from the teacher ---
    # The few-shot subset is config.data.few_shot_fraction / few_shot_per_class; the augmentation is the data
    # section's inception crop (WeCoLoRA: RandomResizedCrop scale (0.2, 1) -> data.crop_area_min = 0.2) and flip.
    c.wecolora = ml_collections.ConfigDict()
    c.wecolora.d = 2                  # weight-copy factor: student = teacher blocks {0, d, 2d, ...} (ceil(L / d) blocks)
    c.wecolora.variants = ("wecolora", "lora_qv", "weco_kd", "scratch_kd")  # rows of the table (train/wecolora.py VARIANTS)
    c.wecolora.lora_rank = 128        # LoRA rank r of wecolora and lora_qv (the README command; argparse default 4)
    c.wecolora.epochs = 10            # passes over the few-shot subset
    c.wecolora.warmup_epochs = 2      # linear-warmup epochs, then cosine to 0
    c.wecolora.batch_size = 1024      # global batch (the reference: 128 x 8 accumulation); lr = blr * batch / 256
    c.wecolora.accum_steps = 1        # micro-batches per step (gradient accumulation, same maths)
    c.wecolora.blr = 1e-3             # base learning rate
    c.wecolora.weight_decay = 0.05    # AdamW decoupled decay on every leaf but biases and 1-D leaves
    c.wecolora.adam_betas = (0.9, 0.95)  # AdamW (b1, b2), the reference's
    c.wecolora.dtype = "auto"         # student compute dtype (auto: bf16 on GPU/TPU, f32 on CPU; teacher: teacher.dtype)
    c.wecolora.remat = False          # rematerialise each student block in the backward pass
    c.wecolora.checkpoint_every = 500  # steps between resume checkpoints (0: only at the end)
    c.wecolora.log_every = 20         # steps between progress lines / summaries

    # --- linear_probe stage (remem_jax/train/linear_probe.py): CLS after encoder_norm, frozen, cached ---
    c.linear_probe = ml_collections.ConfigDict()
    c.linear_probe.epochs = 50        # the README (argparse default 90)
    c.linear_probe.warmup_epochs = 10  # linear-warmup epochs, then cosine to 0
    c.linear_probe.batch_size = 512   # global batch of the head training (and of the feature extraction)
    c.linear_probe.blr = 0.1          # lr = blr * batch / 256
    c.linear_probe.momentum = 0.9     # LARS momentum
    c.linear_probe.trust_coefficient = 0.001  # LARS trust coefficient (1-D leaves: no trust scaling, no decay)
    c.linear_probe.weight_decay = 0.0  # LARS weight decay (ndim > 1 leaves only)
    c.linear_probe.train_fraction = ml_collections.FieldReference(None, field_type=float)  # None: the whole train split; f: class-stratified fraction (the reference's ImageNet --few_shot: 0.1)
    c.linear_probe.reference_rows = True  # also probe the teacher, the untrained weight copy and a random init of the students' shape (the floor)
    c.linear_probe.checkpoint_every = 0  # steps between resume checkpoints (0: only at the end)
    c.linear_probe.log_every = 100    # steps between progress lines / summaries
    # --- relation_distill stage (TinyMIM, remem_jax/train/tinymim.py); teacher = config.teacher ---
    c.tinymim = ml_collections.ConfigDict()
    c.tinymim.student = "S_16"        # student ViT variant ({Ti,S,B,L}_{patch}); its patch must equal the teacher's
    c.tinymim.num_layers = ml_collections.FieldReference(None, field_type=int)  # None: the variant's depth
    c.tinymim.num_heads = ml_collections.FieldReference(None, field_type=int)  # heads of all but the last block; None: the variant's
    c.tinymim.last_block_heads = ml_collections.FieldReference(None, field_type=int)  # heads of the last block; None: the teacher's (needed for relations)
    c.tinymim.posemb = "sincos2d"     # 'sincos2d' (fixed, MAE) or 'learned'
    c.tinymim.drop_path = 0.1         # stochastic depth of every block but the last (0 there)
    c.tinymim.target = "relation"     # relation (released code) | cls | feature (paper's description only)
    c.tinymim.teacher_block = ml_collections.FieldReference(None, field_type=int)  # 1-indexed relation block; None: floor(0.75 L_t) if the teacher is deeper, else its last
    c.tinymim.compare = ()            # extra rows: 'relation@last', 'relation@<block>', 'cls', 'feature'
    c.tinymim.steps = 100_000         # optimizer steps
    c.tinymim.batch_size = 4096       # global batch size (README: 4096)
    c.tinymim.blr = 1.5e-4            # base learning rate: lr = blr * batch_size / 256
    c.tinymim.lr = ml_collections.FieldReference(None, field_type=float)  # None: blr * batch_size / 256
    c.tinymim.warmup_steps = ml_collections.FieldReference(None, field_type=int)  # None: 5% of steps (15 of 300 epochs)
    c.tinymim.weight_decay = 0.05     # AdamW decoupled weight decay (kernels, embeddings, class token)
    c.tinymim.adam_b2 = 0.95          # AdamW beta2 (beta1 0.9)
    c.tinymim.grad_clip_norm = 0.0    # global-norm clip; 0: none (as the released code)
    c.tinymim.color_jitter = 0.4      # brightness/contrast/saturation jitter of the student's input only
    c.tinymim.dtype = "auto"          # student compute dtype (auto: bf16 on GPU/TPU, f32 on CPU; teacher: teacher.dtype)
    c.tinymim.remat = False           # rematerialise each student block in the backward pass (less memory, ~1 more forward)
    c.tinymim.eval_batches = 4        # complete eval batches on which the distillation loss is reported
    c.tinymim.eval_every = 0          # steps between loss evaluations (0: only at the end)
    c.tinymim.checkpoint_every = 1000  # steps between resume checkpoints (0: only at the end)
    c.tinymim.log_every = 100         # steps between progress lines / summaries

    # --- finetune_student stage: every distilled student and a scratch one, identical settings ---
    c.student_finetune = ml_collections.ConfigDict()
    c.student_finetune.steps = 10_000  # optimizer steps
    c.student_finetune.batch_size = 1024  # global batch size
    c.student_finetune.optimizer = "adam"  # 'adam' (AdamW) or 'sgd'
    c.student_finetune.lr = 2e-3      # peak learning rate (MAE recipe: blr 5e-4 * 1024 / 256)
    c.student_finetune.adam_b2 = 0.999  # AdamW beta2
    c.student_finetune.weight_decay = 0.05  # decoupled weight decay
    c.student_finetune.warmup_steps = ml_collections.FieldReference(None, field_type=int)  # None: min(500, 10% of steps)
    c.student_finetune.momentum = 0.9  # SGD momentum (optimizer='sgd')
    c.student_finetune.grad_clip_norm = 0.0  # global-norm clip; 0: none
    c.student_finetune.layer_decay = 1.0  # layer-wise lr decay: block i's lr x decay^(L - i), embeddings x decay^(L + 1); 1 = off (TinyMIM's ViT-B recipe: 0.65)
    c.student_finetune.drop_path = 0.1  # stochastic depth, linear 0 -> drop_path over the blocks (timm)
    c.student_finetune.dtype = "auto"  # compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)
    c.student_finetune.remat = False  # rematerialise each ViT block in the backward pass (less memory, ~1 more forward)
    c.student_finetune.scratch_baseline = True  # also fine-tune the undistilled (MAE-initialised) student
    c.student_finetune.eval_every = 0  # steps between evaluations (0: only at the end)
    c.student_finetune.checkpoint_every = 1000  # steps between resume checkpoints (0: only at the end)
    c.student_finetune.log_every = 100  # steps between progress lines / summaries
    # --- analyze stage (remem_jax/analysis; python -m remem_jax.analyze): MI, expertness, criticality, pruning, rollout ---
    c.analysis = ml_collections.ConfigDict()
    c.analysis.checkpoints = ""        # comma list of AugReg npz paths or names; "" = the teachers finetune_teacher kept (DIR/finetune/<setting>/kept.json)
    c.analysis.kept_steps = "all"      # with checkpoints "": 'all' kept steps of each setting, or the 'last' of each
    c.analysis.tools = "mi,expertness,criticality,pruning,rollout"  # comma list of the tools to run (remem_jax/analysis/stage.py TOOLS)
    c.analysis.num_images = 512        # held-out images (first of the eval split): MI scoring, expertness, criticality, rollout
    c.analysis.num_train_images = 2048  # train-split images (eval preprocessing) the MI decoder is trained on
    c.analysis.batch_size = 64         # images per forward pass (rounded up to a multiple of the device count)
    c.analysis.mi_layers = "encoded"   # MI from: 'encoded' (after encoder_norm), 'all' (every block, then encoded) or e.g. '0,5,encoded'
    c.analysis.decoder_channels = (256, 128, 64)  # MI decoder: widths of the upsample+conv+BN+ReLU stages (a last conv gives 3 channels + sigmoid)
    c.analysis.decoder_steps = 5000    # MI decoder: AdamW updates (fixed number)
    c.analysis.decoder_batch_size = 64  # MI decoder: minibatch size
    c.analysis.decoder_lr = 1e-3       # MI decoder: AdamW learning rate (constant)
    c.analysis.decoder_weight_decay = 1e-4  # MI decoder: decoupled weight decay on kernels
    c.analysis.expertness_blocks = "all"  # blocks whose MLP expertness is measured: 'all' or e.g. '-3,-2,-1'
    c.analysis.criticality_blocks = "-1"  # blocks whose MLP neurons are switched off one at a time: 'all' or e.g. '-1'
    c.analysis.criticality_images = 64  # held-out images the max of criticality runs over
    c.analysis.criticality_max_neurons = ml_collections.FieldReference(None, field_type=int)  # None: every MLP neuron; n: the first n
    c.analysis.criticality_chunk = 64  # neurons per vmapped forward pass
    c.analysis.criticality_top_k = 20  # most critical neurons listed per block
    c.analysis.prune_branches = "attn,mlp"  # branches of the pruning sweep: 'attn', 'mlp' or both
    c.analysis.prune_max_blocks = 4    # K: the sweep prunes the top k = 0..K blocks' branch
    c.analysis.prune_finetune_steps = 0  # 0: measure pruned models as they are; n: fine-tune each n steps first (config.finetune optimizer, no SAM)
    c.analysis.prune_checkpoints = "last"  # pruning sweep on 'all' checkpoints or the 'last' of each setting (of the list)
    c.analysis.rollout_images = 4      # eval images shown with their attention-rollout maps
    return c
