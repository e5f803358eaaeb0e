"""The public Python API: jamba_cli.load / jamba_cli.generate / model(input_ids)."""

import torch

import jamba_cli


def test_public_api_round_trip(checkpoints):
    directory, reference = checkpoints["mini"]
    model, tokenizer = jamba_cli.load(directory, dtype="fp32", device="cpu")
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    assert ids[0, 0].item() == tokenizer.bos_token_id  # the checkpoint's tokenizer adds BOS
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)

    text = jamba_cli.generate(model, tokenizer, "To be, or not to be", max_tokens=12)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2)[0, ids.shape[1]:]
    want = [t for t in want.tolist() if t != 2]
    assert text == tokenizer.decode(want)


def test_prompt_as_token_ids_is_used_as_is(mini):
    model, tokenizer = mini
    ids = tokenizer.encode("Now is the winter", add_special_tokens=False)
    assert ids[0] != tokenizer.bos_token_id
    as_ids = jamba_cli.generate(model, tokenizer, ids, max_tokens=10)
    with_bos = jamba_cli.generate(model, tokenizer, "Now is the winter", max_tokens=10)
    assert as_ids == jamba_cli.generate(model, tokenizer, list(ids), max_tokens=10)
    assert as_ids != with_bos  # the string prompt got a BOS, the id list did not


def test_sampling_is_reproducible_with_a_seed(mini):
    model, tokenizer = mini
    run = lambda seed: jamba_cli.generate(model, tokenizer, "Friends", max_tokens=16, temperature=1.0, seed=seed)
    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


def test_generation_stops_at_eos(mini):
    import dataclasses

    from jamba_cli.generation import generate_step

    model, tokenizer = mini
    prompt = tokenizer.encode("Romans")
    greedy = [int(t) for t in generate_step(model, torch.tensor(prompt), max_tokens=8)]
    stop = greedy[3]
    first = greedy.index(stop)
    config = model.config
    try:  # pretend the 4th greedy token is the checkpoint's EOS
        model.config = dataclasses.replace(config, eos_token_id=[config.eos_token_id, stop])
        assert jamba_cli.generate(model, tokenizer, "Romans", max_tokens=8) == tokenizer.decode(greedy[:first])
    finally:
        model.config = config
