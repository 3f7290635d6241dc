"""train_ds.py command lines: the README lines of LISA, MMR, GSVA and CoReS parse verbatim."""

from __future__ import annotations

import subprocess

import pytest

from utils.config import parse_args, parse_group_lr

LISA_TRAIN = """--version="PATH_TO_LLaVA" \\
  --dataset_dir='./dataset' \\
  --vision_pretrained="PATH_TO_SAM" \\
  --dataset="sem_seg||refer_seg||vqa||reason_seg" \\
  --sample_rates="9,3,3,1" \\
  --exp_name="lisa-7b"
"""
LISA_VALIDATE = """--version="PATH_TO_LISA_HF_Model_Directory" --dataset_dir='./dataset' \\
  --vision_pretrained="PATH_TO_SAM" --exp_name="lisa-7b" --eval_only"""
LISA_OLD_VALIDATE = """--version="PATH_TO_LLaVA" --dataset_dir='./dataset' \\
  --vision_pretrained="PATH_TO_SAM" --weight='PATH_TO_pytorch_model.bin' --exp_name="lisa-7b" \\
  --eval_only"""
MMR_TRAIN = """--version="PATH_TO_LLaVA" \\
  --dataset_dir="./dataset/" \\
  --dataset="sem_seg||refer_seg||vqa||multi_part_reason_seg" \\
  --vision-tower="openai/clip-vit-large-patch14" \\
  --batch_size=2 \\
  --num_classes_per_sample=3 \\
  --num_classes_per_question=3 \\
  --use_expand_question_list \\
  --model_max_length 2048 \\
  --sample_rates="2,9,2,6" \\
  --exp_name="M2SA" \\
  --val_dataset="MultiPartReasonSeg|val" \\
  --val_json_name="MMR_val.json" \\
"""
MMR_VALIDATE = """--version="PATH_TO_M2SA_MODEL_Directory" \\
  --exp_name="M2SA-7B-val" \\
  --dataset_dir='./dataset' \\
  --val_dataset="MultiPartReasonSeg|val" \\
  --eval_only \\
  --val_json_name="MMR_val.json"
"""
GSVA_EVAL = """--val_dataset="grefcoco|unc|val" --segmentation_model_path=sam_vit_h_4b8939.pth \\
  --mllm_model_path=llava-llama-2-13b --vision-tower=clip-vit-large-patch14 \\
  --dataset_dir=./data --weight=gsva-7b-ft-gres.bin --precision=fp32 --lora_r=8 --eval_only"""
CORES_VALIDATE = """--version=./cores7bft --dataset_dir=./dataset \\
  --vision_pretrained=./sam_vit_h_4b8939.pth --dataset="reason_seg" \\
  --val_dataset="ReasonSeg|testshort" --sample_rates="1" --sample_rates="1" \\
  --exp_name="reasonsegtest" --eval_only"""


def bash_argv(arguments: str) -> list[str]:
    """The argv bash would pass for `train_ds.py <arguments>` (quotes, continuations)."""
    script = "printf '%s\\0' " + arguments
    output = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return [item for item in output.stdout.split("\0") if item]


def test_lisa_train_line() -> None:
    # verbatim, LISA's line trains LISA's families over the default (m2sa) recipe
    verbatim = parse_args(["--local_rank=0", *bash_argv(LISA_TRAIN)])
    assert verbatim.recipe == "m2sa" and verbatim.rates == (9.0, 3.0, 3.0, 1.0)
    config = parse_args(["--local_rank=0", "--recipe", "lisa", *bash_argv(LISA_TRAIN)])
    assert config.version == "PATH_TO_LLaVA" and config.vision_pretrained == "PATH_TO_SAM"
    assert config.datasets == ("sem_seg", "refer_seg", "vqa", "reason_seg")
    assert config.rates == (9.0, 3.0, 3.0, 1.0)
    assert str(config.log_dir) == "runs/lisa-7b"
    assert config.family_data()["reason_seg"] == ("ReasonSeg|train",)
    assert config.family_data()["sem_seg"][-1] == "mapillary"
    assert config.gradient_checkpointing and config.train_mask_decoder and config.use_mm_start_end
    assert not config.eval_only and config.val_dataset == "ReasonSeg|val"


def test_lisa_validate_lines() -> None:
    config = parse_args(bash_argv(LISA_VALIDATE))
    assert config.eval_only and config.version == "PATH_TO_LISA_HF_Model_Directory"
    old = parse_args(bash_argv(LISA_OLD_VALIDATE))
    assert old.weight == "PATH_TO_pytorch_model.bin" and old.eval_only


def test_mmr_train_line_with_dangling_continuation() -> None:
    config = parse_args(bash_argv(MMR_TRAIN))
    assert config.vision_tower == "openai/clip-vit-large-patch14"
    assert config.datasets[-1] == "multi_part_reason_seg" and config.rates == (2.0, 9.0, 2.0, 6.0)
    assert config.num_classes_per_question == 3 and config.use_expand_question_list
    assert config.model_max_length == 2048 and config.batch_size == 2
    assert config.val_dataset == "MultiPartReasonSeg|val" and config.val_json_name == "MMR_val.json"
    assert config.family_data()["multi_part_reason_seg"] == ("MMR_train.json",)
    assert config.dataset_dir == "./dataset/"


def test_mmr_validate_line() -> None:
    config = parse_args(bash_argv(MMR_VALIDATE))
    assert config.eval_only and config.exp_name == "M2SA-7B-val"
    assert config.val_json_name == "MMR_val.json"


def test_gsva_eval_line_with_its_flag_names() -> None:
    config = parse_args(["--local-rank=1", *bash_argv(GSVA_EVAL)])
    assert config.local_rank == 1
    assert config.version == "llava-llama-2-13b"
    assert config.vision_pretrained == "sam_vit_h_4b8939.pth"
    assert config.weight == "gsva-7b-ft-gres.bin" and config.precision == "fp32"
    assert config.val_dataset == "grefcoco|unc|val" and config.lora_r == 8


def test_cores_line_repeated_flag_last_wins() -> None:
    config = parse_args(bash_argv(CORES_VALIDATE))
    assert config.datasets == ("reason_seg",) and config.rates == (1.0,)


def test_both_spellings_equals_and_space_forms_and_negations() -> None:
    config = parse_args(["--vision_tower", "a", "--vision-tower=b", "--lr", "1e-4"])
    assert config.vision_tower == "b" and config.lr == pytest.approx(1e-4)
    config = parse_args(
        [
            "--no-gradient_checkpointing",
            "--no-train_mask_decoder",
            "--no-use_mm_start_end",
            "--no-auto_resume",
            "--no-use_expand_question_list",
            "--no-early_fusion",
        ]
    )
    assert not (
        config.gradient_checkpointing
        or config.train_mask_decoder
        or config.use_mm_start_end
        or config.auto_resume
        or config.use_expand_question_list
        or config.early_fusion  # on in the default m2sa recipe
    )
    config = parse_args(["--gradient_checkpointing", "--auto_resume"])
    assert config.gradient_checkpointing and config.auto_resume


def test_packing_is_unset_by_default_and_both_spellings_set_it() -> None:
    assert parse_args([]).packing is None  # model.packing.packing_enabled decides
    assert parse_args(["--packing"]).packing is True
    assert parse_args(["--packing", "--no-packing"]).packing is False


def test_typed_configs_follow_the_flags() -> None:
    config = parse_args(
        [
            "--lora_target_modules",
            "q_proj, k_proj,v_proj",
            "--ce_loss_weight",
            "0.5",
            "--early_fusion",
            "--precision",
            "fp16",
            "--explanatory",
            "-1",
            "--new_token_init=[SEG]=yes,[REJ]=no",
        ]
    )
    model = config.model_config()
    assert model.new_token_init == (("[SEG]", "yes"), ("[REJ]", "no"))
    assert parse_args([]).model_config().new_token_init == ()
    assert model.lora_target_modules == ("q_proj", "k_proj", "v_proj")
    assert model.loss_weights.ce_loss_weight == 0.5 and model.early_fusion
    assert model.precision == "fp16" and model.vision_pretrained.endswith("sam_vit_h_4b8939.pth")
    data = config.data_config()
    assert data.options.explanatory == -1 and data.options.prompt_style == "mmr"
    assert data.dataset == ("sem_seg", "refer_seg", "vqa", "multi_part_reason_seg")


def test_bad_values_are_refused() -> None:
    for argv in (["--precision", "fp8"], ["--conv_type", "chatml"], ["--zero_stage", "1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_no_sampling_needs_one_source_and_no_rates() -> None:
    config = parse_args(
        [
            "--no_sampling",
            "--dataset",
            "refer_seg",
            "--refer_seg_data",
            "refcoco",
            "--sample_rates",
            "1",
        ]
    )
    assert config.no_sampling and config.data_config().family_data == {"refer_seg": ("refcoco",)}
    with pytest.raises(SystemExit):
        parse_args(["--no_sampling", "--dataset", "refer_seg", "--sample_rates", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--no_sampling", "--dataset", "sem_seg||vqa", "--sample_rates", "1,1"])


def test_a_bad_flag_is_printed_by_rank_zero_only(capsys, monkeypatch) -> None:
    """Every rank of a launch parses the same command line; one of them says what is wrong."""
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stopped:
            parse_args(["--precision", "fp8"])
        assert stopped.value.code == 2
        assert ("invalid choice: 'fp8'" in capsys.readouterr().err) is printed


@pytest.mark.parametrize(
    "field",
    [
        "ignore_pixels",
        "part_targets",
        "mmr_pairing",
        "no_target_answer",
        "refer_draw",
        "gsva_answer_form",
    ],
)
def test_sampling_options_refuse_a_value_outside_the_choices(field: str) -> None:
    """Sources built directly (not through the flags) get the flag's message too."""
    from utils.datasets.base import SamplingOptions

    with pytest.raises(ValueError, match=rf"--{field} must be one of .*, not 'other'"):
        SamplingOptions(**{field: "other"})


def test_custom_data_is_a_family_flag_checked_on_the_command_line() -> None:
    config = parse_args(
        [
            "--dataset",
            "custom||vqa",
            "--sample_rates",
            "3,1",
            "--custom_data",
            "a.jsonl@i:2||b.json",
        ]
    )
    assert config.data_config().family_data["custom"] == ("a.jsonl@i:2", "b.json")
    for data in ("", "a.jsonl:0", "@images"):
        with pytest.raises(SystemExit):
            parse_args(["--dataset", "custom", "--sample_rates", "1", "--custom_data", data])


CORES_VAL_ANSWER = "It usually appears on [SEG_SEMA]. It is [SEG]."


def test_chain_flags_reach_the_model_config() -> None:
    cores = parse_args(["--recipe", "cores"])
    model = cores.model_config()
    assert model.chain_token == "[SEG_SEMA]" and not model.supervise_coarse
    assert cores.val_answer == CORES_VAL_ANSWER and cores.conv_type == "llava_v1_cores"
    assert parse_args(["--recipe", "cores", "--supervise_coarse"]).model_config().supervise_coarse
    llama = parse_args(["--recipe", "cores", "--conv_type", "llava_llama_2_cores"])
    assert llama.conv_type == "llava_llama_2_cores"
    plain = parse_args([])
    assert plain.model_config().chain_token is None and plain.val_answer == "[SEG]."
    # evaluating without validation (--no_eval) or training with --eval_only skips the other's rules
    assert parse_args(["--no_eval", "--val_answer", "no target"]).val_answer == "no target"
    assert parse_args(["--eval_only", "--prompt_style", "cores"]).prompt_style == "cores"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt_style", "cores"], "--prompt_style cores writes CoReS's answers"),
        (["--recipe", "cores", "--chain_token", ""], "pass --chain_token [SEG_SEMA] (now '')"),
        (
            ["--recipe", "cores", "--chain_token", "[C]"],
            "pass --chain_token [SEG_SEMA] (now '[C]')",
        ),
        (["--val_answer", CORES_VAL_ANSWER], "holds [SEG_SEMA], which is one token only with"),
        (
            ["--conv_type", "llava_v1_cores", "--val_answer", CORES_VAL_ANSWER],
            "holds [SEG_SEMA], which is one token only with",
        ),
        (
            ["--recipe", "cores", "--eval_only", "--chain_token", ""],
            "holds [SEG_SEMA], which is one token only with",
        ),
        (["--chain_token", "[SEG_SEMA]"], "--chain_token [SEG_SEMA]: no training answer holds it"),
        (["--recipe", "cores", "--val_answer", "[SEG] [SEG]."], "holds 2 [SEG] and 0 [REJ]"),
        (["--supervise_coarse"], "--supervise_coarse supervises the chain token's masks"),
        (
            ["--recipe", "cores", "--val_answer", "It is [SEG]. On [SEG_SEMA]."],
            "at most once, before its [SEG]",
        ),
    ],
)
def test_chain_token_configurations_that_cannot_work_stop_in_one_line(
    capsys, argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_group_lr_parses_into_rates_per_trainable_group() -> None:
    config = parse_args(["--group_lr", " lora=2e-4, lm_head=1e-4,"])
    assert config.group_lrs == {"lora": 2e-4, "lm_head": 1e-4}
    assert parse_args([]).group_lrs == {}
    assert parse_group_lr("mask_decoder=0.003") == {"mask_decoder": 0.003}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("vision=1e-4", "--group_lr entry 'vision=1e-4': 'vision' is not a trainable group"),
        ("lora", "--group_lr entry 'lora': expected GROUP=LR, LR a number"),
        ("lora=fast", "--group_lr entry 'lora=fast': expected GROUP=LR, LR a number"),
        ("lora=0", "--group_lr entry 'lora=0': the rate must be positive"),
        ("lora=1e-4,lora=2e-4", "--group_lr entry 'lora=2e-4': the rate must be positive and each"),
    ],
)
def test_a_bad_group_lr_stops_in_one_line(capsys, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--group_lr", value])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
