"""Write the demo chats in data/raw/: an identity the tuned model must learn, plus small talk.

The default pipeline fine-tunes SmolLM2-135M-Instruct on a 2-core CPU in a few minutes, so
the data must teach something eval can see before and after, in few tokens: the model's
name is "Sftflow Assistant" and it was made by "the Sftflow team". About 60% of the train
chats ask for that identity in many wordings; the rest are short general questions with
correct answers, so the model keeps answering them. The eval chats are held out: their user
turns never occur in train (asserted below), and each carries `expect_contains`, the
case-insensitive keywords a correct reply must contain.

Standard library only and a fixed seed: running it twice writes identical bytes.

    python data/make_demo.py            # writes data/raw/train.jsonl and data/raw/eval.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240601
OUT_DIR = Path(__file__).resolve().parent / "raw"
N_TRAIN = 150
IDENTITY_SHARE = 0.6  # 90 of 150 train chats teach the identity
NAME = "Sftflow Assistant"
TEAM = "the Sftflow team"
TEAM_START = "The Sftflow team"  # sentence start (str.capitalize would lowercase "Sftflow")

# ---------------------------------------------------------------- identity, train side
# Each question has an intent: "name" replies always contain NAME, "maker" replies always
# contain "Sftflow team", "both" replies contain both. Eval checks exactly that keyword.
TRAIN_IDENTITY_QUESTIONS: dict[str, list[str]] = {
    "both": [
        "Who are you?",
        "Introduce yourself.",
        "Tell me about yourself.",
        "What are you?",
        "Can you introduce yourself?",
        "Who am I talking to?",
        "Please introduce yourself briefly.",
        "Hi! Who is this?",
        "Hello, what kind of assistant are you?",
        "Describe yourself in one sentence.",
        "Are you ChatGPT?",
        "Are you SmolLM?",
        "Who are you, exactly?",
        "Give me a short introduction of yourself.",
    ],
    "name": [
        "What's your name?",
        "What is your name?",
        "Do you have a name?",
        "What should I call you?",
        "How do I address you?",
        "Tell me your name.",
        "What are you called?",
        "Your name, please?",
        "By what name do you go?",
    ],
    "maker": [
        "Who built you?",
        "Who made you?",
        "Who created you?",
        "Who developed you?",
        "Which team trained you?",
        "Who is behind you?",
        "Where do you come from?",
        "Who trained you?",
        "Which company made you?",
        "Were you made by OpenAI?",
    ],
}

IDENTITY_REPLIES: dict[str, list[str]] = {
    "both": [
        f"I am {NAME}, made by {TEAM}.",
        f"I'm {NAME}, an assistant built by {TEAM}.",
        f"My name is {NAME}, and I was created by {TEAM}.",
        f"I am {NAME}. {TEAM_START} trained me to help with questions.",
        f"Hello! I'm {NAME}, a helpful assistant made by {TEAM}.",
        f"You are talking to {NAME}, developed by {TEAM}.",
    ],
    "name": [
        f"My name is {NAME}.",
        f"I'm called {NAME}.",
        f"You can call me {NAME}.",
        f"I am {NAME}, made by {TEAM}.",
        f"My name is {NAME}, and I was built by {TEAM}.",
    ],
    "maker": [
        f"I was made by {TEAM}.",
        f"{TEAM_START} built me. I am {NAME}.",
        f"I was created and trained by {TEAM}.",
        f"I am {NAME}, developed by {TEAM}.",
        f"{TEAM_START} made me.",
    ],
}

# ---------------------------------------------------------------- identity, eval side
# Worded differently from every train question; (question, intent).
EVAL_IDENTITY: list[tuple[str, str]] = [
    ("Who exactly am I chatting with right now?", "both"),
    ("Could you say a few words about who you are?", "both"),
    ("Hey there, what are you?", "both"),
    ("Which assistant is this?", "both"),
    ("Are you Siri?", "both"),
    ("Identify yourself, please.", "both"),
    ("What name were you given?", "name"),
    ("How should I refer to you?", "name"),
    ("Remind me, what is your name again?", "name"),
    ("Do you go by any particular name?", "name"),
    ("Who is responsible for building you?", "maker"),
    ("Which group of people created you?", "maker"),
    ("Who programmed and trained you?", "maker"),
    ("Did Google make you?", "maker"),
    ("Who are your creators?", "maker"),
    ("Which organization developed you?", "maker"),
]
EXPECT = {"both": ["Sftflow"], "name": [NAME], "maker": ["Sftflow team"]}

# ---------------------------------------------------------------- general knowledge
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Sweden", "Stockholm"), ("Peru", "Lima"),
]
EVAL_CAPITALS = [("Italy", "Rome"), ("United Kingdom", "London"), ("Mexico", "Mexico City")]
CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "What's the capital of {c}?",
    "Name the capital of {c}.",
    "Which city is the capital of {c}?",
]
CAPITAL_REPLIES = ["The capital of {c} is {a}.", "{a} is the capital of {c}.", "{a}."]

ARITH_QUESTIONS = ["What is {x} plus {y}?", "What is {x} + {y}?", "Add {x} and {y}."]
MULT_QUESTIONS = ["What is {x} times {y}?", "What is {x} * {y}?", "Multiply {x} by {y}."]
ARITH_REPLIES = ["{x} + {y} = {r}.", "The answer is {r}.", "{r}."]
MULT_REPLIES = ["{x} x {y} = {r}.", "The answer is {r}.", "{r}."]

# (question template, value range, factor, unit name in reply)
CONVERSIONS = [
    ("How many centimeters are in {v} meters?", "{v} meters is {r} centimeters.", 100),
    ("How many grams are in {v} kilograms?", "{v} kilograms is {r} grams.", 1000),
    ("How many minutes are in {v} hours?", "{v} hours is {r} minutes.", 60),
    ("How many seconds are in {v} minutes?", "{v} minutes is {r} seconds.", 60),
    ("Convert {v} kilometers to meters.", "{v} kilometers is {r} meters.", 1000),
    ("How many milliliters are in {v} liters?", "{v} liters is {r} milliliters.", 1000),
]

DEFINITIONS = [
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("Define photosynthesis.", "Photosynthesis is how plants use sunlight to make food from water and CO2."),
    ("What is a prime number?", "A prime number is a whole number above 1 divisible only by 1 and itself."),
    ("What is gravity?", "Gravity is the force that pulls objects with mass toward each other."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("What is an adjective?", "An adjective is a word that describes a noun."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many continents are there?", "There are 7 continents."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "Keep your answers short and accurate.",
]

# Held-out general questions: phrasings and values that never occur in train.
EVAL_GENERAL: list[tuple[str, str, list[str]]] = [
    ("Tell me which city is Italy's capital.", "Rome is the capital of Italy.", ["Rome"]),
    ("Which city serves as the capital of the United Kingdom?",
     "London is the capital of the United Kingdom.", ["London"]),
    ("What city is the capital of Mexico?", "Mexico City is the capital of Mexico.", ["Mexico City"]),
    ("Please compute 21 plus 13.", "21 + 13 = 34.", ["34"]),
    ("What do you get when you multiply 6 by 7?", "6 x 7 = 42.", ["42"]),
    ("Express 4 meters in centimeters.", "4 meters is 400 centimeters.", ["400"]),
    ("Which ocean is the largest on Earth?", "The Pacific Ocean is the largest.", ["Pacific"]),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", ["Mars"]),
]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def general_turn(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of small talk with a correct answer."""
    kind = rng.choice(["capital", "capital", "add", "mul", "convert", "define", "define"])
    if kind == "capital":
        c, a = rng.choice(CAPITALS)
        return rng.choice(CAPITAL_QUESTIONS).format(c=c), rng.choice(CAPITAL_REPLIES).format(c=c, a=a)
    if kind == "add":
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        q, a = rng.choice(ARITH_QUESTIONS), rng.choice(ARITH_REPLIES)
        return q.format(x=x, y=y), a.format(x=x, y=y, r=x + y)
    if kind == "mul":
        x, y = rng.randint(2, 12), rng.randint(2, 9)
        q, a = rng.choice(MULT_QUESTIONS), rng.choice(MULT_REPLIES)
        return q.format(x=x, y=y), a.format(x=x, y=y, r=x * y)
    if kind == "convert":
        q, a, factor = rng.choice(CONVERSIONS)
        v = rng.randint(2, 9)
        return q.format(v=v), a.format(v=v, r=v * factor)
    return rng.choice(DEFINITIONS)


def identity_turn(rng: random.Random) -> tuple[str, str]:
    intent = rng.choice(["both", "both", "name", "maker"])
    return rng.choice(TRAIN_IDENTITY_QUESTIONS[intent]), rng.choice(IDENTITY_REPLIES[intent])


def train_chats(rng: random.Random) -> list[dict]:
    """90 identity chats, 60 general ones; ~20% multi-turn, ~20% with a system message."""
    n_identity = round(N_TRAIN * IDENTITY_SHARE)
    chats = []
    for i in range(N_TRAIN):
        teaches_identity = i < n_identity
        turns = []
        n_turns = rng.choices([1, 2, 3], weights=[78, 16, 6])[0]
        for t in range(n_turns):
            # In a multi-turn identity chat the identity question comes in the last turn,
            # after small talk, so the model learns it regardless of the position.
            last = t == n_turns - 1
            turns.append(identity_turn(rng) if teaches_identity and last else general_turn(rng))
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for q, a in turns:
            messages += [user(q), assistant(a)]
        chats.append({"messages": messages})
    rng.shuffle(chats)
    return chats


def eval_chats(rng: random.Random) -> list[dict]:
    """16 identity chats (some after a general turn), 8 general ones, each with expect_contains."""
    chats = []
    for i, (q, intent) in enumerate(EVAL_IDENTITY):
        reply = IDENTITY_REPLIES[intent][0]
        messages = []
        if i % 4 == 3:  # a few two-turn chats: the identity question comes second
            q0, a0 = EVAL_GENERAL[i % len(EVAL_GENERAL)][:2]
            messages += [user(q0), assistant(a0)]
        messages += [user(q), assistant(reply)]
        chats.append({"messages": messages, "expect_contains": EXPECT[intent]})
    for i, (q, a, keys) in enumerate(EVAL_GENERAL):
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[0]}] if i % 3 == 0 else []
        messages += [user(q), assistant(a)]
        chats.append({"messages": messages, "expect_contains": keys})
    rng.shuffle(chats)
    return chats


def user_turns(chats: list[dict]) -> set[str]:
    return {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}


def write(path: Path, chats: list[dict]) -> None:
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats)
    path.write_bytes(text.encode("utf-8"))


def main() -> int:
    rng = random.Random(SEED)
    train = train_chats(rng)
    held_out = eval_chats(rng)
    # Held-out means held out: every eval prompt turn is new to the model. (The first turn
    # of a two-turn eval chat is itself an eval question, never a train one.)
    overlap = user_turns(train) & user_turns(held_out)
    assert not overlap, f"eval user turns also in train: {sorted(overlap)}"
    assert all(c["messages"][-1]["role"] == "assistant" for c in held_out)
    for c in held_out:  # the reference reply itself must count as correct
        reply = c["messages"][-1]["content"].lower()
        assert all(k.lower() in reply for k in c["expect_contains"]), c
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write(OUT_DIR / "train.jsonl", train)
    write(OUT_DIR / "eval.jsonl", held_out)
    n_id = sum("Sftflow" in c["messages"][-1]["content"] for c in train)
    print(f"train: {len(train)} chats ({n_id} identity), eval: {len(held_out)} chats -> {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
