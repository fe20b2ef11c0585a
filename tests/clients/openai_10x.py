"""The 10x load test a user runs before deploying, with the official OpenAI Python SDK and its
default retries (two, honouring Retry-After): first the normal concurrency, then ten times it.

Usage: python3 openai_10x.py BASE_URL MODEL NORMAL_CLIENTS REQUESTS_PER_CLIENT MAX_TOKENS
(REQUESTS_PER_CLIENT of the 10x phase; the normal clients send ten times as many each.)
Prints one JSON object: per phase the clients, answers, errors (by exception type), wall time,
answers and completion tokens per second, and p50/p99 latency of the answers (retries in). Every request is bounded (count and a 120 s SDK timeout).
"""
import asyncio
import json
import sys
import time

import openai

base_url, model = sys.argv[1], sys.argv[2]
normal, per_client, max_tokens = (int(a) for a in sys.argv[3:6])


async def client_loop(client, requests, tokens, latencies, errors):
    try:
        for i in range(requests):
            started = time.perf_counter()
            try:
                answer = await client.completions.create(
                    model=model, prompt=f"Patient {i}: chest pain, troponin", max_tokens=max_tokens,
                    temperature=1.0, extra_body={"ignore_eos": True},
                )
                tokens.append(answer.usage.completion_tokens)
                latencies.append(time.perf_counter() - started)
            except openai.OpenAIError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    finally:
        await client.close()


async def phase(clients, requests):
    tokens, latencies, errors = [], [], {}
    # One SDK client per simulated user, as separate services would have; default max_retries.
    # Made before the clock starts: each loads its own TLS context, which costs CPU here.
    users = [openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120) for _ in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(client_loop(user, requests, tokens, latencies, errors) for user in users))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": clients * requests,
        "answers": len(tokens),
        "errors": errors,
        "full_length": sum(1 for t in tokens if t == max_tokens),
        "wall_s": round(wall, 3),
        "answers_per_s": round(len(tokens) / wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        # Latency of answered requests, retries included (seconds).
        "p50_s": round(percentile(latencies, 0.50), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
    }


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main():
    # A short warm-up so the server has measured its step times before the clock starts.
    await phase(2, 2)
    # The same requests in both phases: ten times as many each from the normal clients, then
    # ten times the clients.
    report = {"normal": await phase(normal, per_client * 10)}
    report["tenfold"] = await phase(normal * 10, per_client)
    print(json.dumps(report))


asyncio.run(main())
