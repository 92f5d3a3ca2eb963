"""The prompt set used for prediction alignment, written for this project.

Prompts are built from templates x fillers (topics, sentences, tasks) in five families: chat
instructions, translation, summarization, open continuations and code. The only outside text is
what Python itself ships (module docstrings, for summarization requests), so the set is the same
wherever the same Python runs. A fixed part is held out by a hash of the prompt text, so it never
depends on the order or on how many prompts a run uses.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

TOPICS = [
    "photosynthesis",
    "black holes",
    "the water cycle",
    "climate change",
    "volcanoes",
    "earthquakes",
    "the human heart",
    "vaccines",
    "the immune system",
    "DNA",
    "evolution",
    "gravity",
    "electricity",
    "magnetism",
    "the solar system",
    "the moon",
    "Mars",
    "renewable energy",
    "solar panels",
    "wind turbines",
    "nuclear power",
    "recycling",
    "ocean currents",
    "rainforests",
    "deserts",
    "honey bees",
    "dinosaurs",
    "sleep",
    "healthy eating",
    "exercise",
    "meditation",
    "stress",
    "time management",
    "public speaking",
    "learning a new language",
    "job interviews",
    "writing a resume",
    "saving money",
    "budgeting",
    "investing",
    "inflation",
    "interest rates",
    "the stock market",
    "small businesses",
    "marketing",
    "teamwork",
    "leadership",
    "remote work",
    "the internet",
    "computer networks",
    "machine learning",
    "neural networks",
    "databases",
    "cloud computing",
    "cybersecurity",
    "passwords",
    "encryption",
    "open source software",
    "programming",
    "version control",
    "smartphones",
    "social media",
    "video games",
    "robots",
    "self-driving cars",
    "electric cars",
    "airplanes",
    "trains",
    "bicycles",
    "city planning",
    "ancient Rome",
    "ancient Egypt",
    "the printing press",
    "the industrial revolution",
    "the French Revolution",
    "world history",
    "democracy",
    "human rights",
    "libraries",
    "museums",
    "music",
    "jazz",
    "painting",
    "photography",
    "poetry",
    "theater",
    "movies",
    "cooking pasta",
    "baking bread",
    "coffee",
    "tea",
    "gardening",
    "houseplants",
    "dogs",
    "cats",
    "birds",
    "whales",
    "friendship",
    "kindness",
    "happiness",
    "creativity",
    "curiosity",
    "books",
    "reading habits",
    "mathematics",
    "prime numbers",
    "probability",
    "statistics",
    "geometry",
    "chess",
    "football",
    "the Olympic Games",
    "mountain climbing",
    "camping",
    "travel",
    "packing for a trip",
    "the weather",
    "snow",
    "rainbows",
    "the ocean",
    "rivers",
    "forests",
    "clean water",
    "air pollution",
    "plastic waste",
    "composting",
    "first aid",
    "hand washing",
    "the brain",
    "memory",
    "habits",
    "motivation",
    "online privacy",
    "email etiquette",
    "a good night's sleep",
    "volunteering",
    "cities",
    "villages",
    "farming",
    "bridges",
    "skyscrapers",
    "the metric system",
    "calendars",
    "clocks",
    "maps",
    "the alphabet",
]

CHAT_TEMPLATES = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Explain {t} to a ten-year-old.",
    "How does {t} work?",
    "Why is {t} important?",
    "Give me three interesting facts about {t}.",
    "List five tips related to {t}.",
    "What are the pros and cons of {t}?",
    "Write a short poem about {t}.",
    "Write a haiku about {t}.",
    "Write a short paragraph about {t}.",
    "Describe {t} in two sentences.",
    "What are common misconceptions about {t}?",
    "Can you give me a simple definition of {t}?",
    "What should a beginner know about {t}?",
    "Write a tweet about {t}.",
    "Suggest a title for a blog post about {t}.",
    "Write three quiz questions about {t}.",
    "What is the history of {t}?",
    "How can I learn more about {t}?",
    "Compare {t} and {u}.",
    "What do {t} and {u} have in common?",
    "Write a short dialogue between two friends talking about {t}.",
    "I am curious about {t}. Where should I start?",
    "Summarize what you know about {t} in one paragraph.",
    "hi! can you tell me something about {t}?",
    "Write an email to a colleague about {t}.",
    "Give an example that illustrates {t}.",
]

SENTENCES = [
    "The weather is nice today.",
    "I would like a cup of coffee, please.",
    "Where is the train station?",
    "My brother plays the guitar every evening.",
    "The library opens at nine in the morning.",
    "We are going to the beach this weekend.",
    "She bought a new book yesterday.",
    "Can you help me find my keys?",
    "The children are playing in the garden.",
    "This restaurant serves the best soup in town.",
    "I have lived in this city for ten years.",
    "Please close the window, it is cold.",
    "The meeting has been moved to Thursday.",
    "How much does this ticket cost?",
    "Thank you very much for your help.",
    "The cat is sleeping on the sofa.",
    "I forgot my umbrella at home.",
    "Our flight leaves at seven o'clock.",
    "He is learning to cook Italian food.",
    "The museum is closed on Mondays.",
    "Good morning, how are you?",
    "I love reading books at night.",
    "The store is on the left side of the street.",
    "We need to buy milk and bread.",
    "It is raining, so we will stay inside.",
    "My phone battery is almost empty.",
    "The teacher explained the lesson clearly.",
    "Let's meet in front of the cinema.",
    "I am sorry, I do not understand.",
    "The river flows through the old town.",
]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]
TRANSLATION_TEMPLATES = [
    "Translate the following sentence into {lang}: {s}",
    "Translate to {lang}:\n{s}",
    'How do you say "{s}" in {lang}?',
    "Please translate this English text into {lang}.\n\n{s}",
]

SUMMARY_TEMPLATES = [
    "Summarize the following text in one sentence:\n\n{p}",
    "Write a short summary of this text:\n\n{p}",
    "What is the main idea of the following passage?\n\n{p}",
    "TL;DR:\n\n{p}",
    "Summarize in three bullet points:\n\n{p}",
]
# Stdlib modules whose docstrings make readable passages to summarize.
DOC_MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "xml",
    "zipfile",
    "zlib",
    "zoneinfo",
]

CONTINUATION_OPENINGS = [
    "Once upon a time, in a small village by the sea,",
    "The old lighthouse keeper opened the door and",
    "It was the first day of school, and",
    "When the robot woke up, it",
    "The letter arrived on a rainy Tuesday.",
    "Deep in the forest, there was a hidden path that",
    "The spaceship landed quietly behind the hill.",
    "My grandmother always said that",
    "The best way to start the morning is",
    "In the year 2150, cities",
    "The detective looked at the empty room and",
    "Nobody expected the little dog to",
    "The secret to a good cup of tea is",
    "After years of practice, the young pianist",
    "The market was full of colors and sounds.",
    "On top of the mountain, the climbers found",
    "The town had never seen snow before, until",
    "Learning to ride a bicycle taught me",
    "The scientist stared at the results and",
    "At midnight, the clock tower",
]
CONTINUATION_TEMPLATES = [
    "Continue this story: {o}",
    "Write the next paragraph of this story:\n\n{o}",
    "Complete the following text.\n\n{o}",
    "Finish this sentence in a creative way: {o}",
]

CODE_TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "computes the factorial of a number",
    "returns the n-th Fibonacci number",
    "counts the vowels in a string",
    "sorts a list of numbers",
    "finds the largest element in a list",
    "removes duplicates from a list",
    "checks if a string is a palindrome",
    "merges two sorted lists",
    "computes the average of a list",
    "converts Celsius to Fahrenheit",
    "counts the words in a sentence",
    "reads a text file and prints each line",
    "sums the digits of an integer",
    "finds the greatest common divisor of two numbers",
    "flattens a nested list",
    "capitalizes every word in a string",
    "returns the squares of the numbers from 1 to n",
    "checks whether two strings are anagrams",
    "implements binary search",
    "counts how often each character appears in a string",
    "generates a random password",
    "validates an email address",
    "computes the area of a circle",
]
CODE_LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "Go"]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.",
    "How do I write a {lang} program that {task}?",
    "Show me {lang} code that {task}, with comments.",
    "Write a short {lang} snippet that {task} and explain it.",
]
CODE_SNIPPETS = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "def greet(name):\n    print('Hello, ' + name)",
    "numbers = [3, 1, 2]\nnumbers.sort()\nprint(numbers)",
    "x = 5\nwhile x > 0:\n    print(x)\n    x -= 1",
    "def is_even(n):\n    return n % 2 == 0",
    "words = text.split()\ncounts = {}\nfor w in words:\n    counts[w] = counts.get(w, 0) + 1",
    "with open('data.txt') as f:\n    lines = f.readlines()",
    "def maximum(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n            best = x\n    return best",
    "squares = [x * x for x in range(5)]",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY age;",
    "function double(x) {\n  return x * 2;\n}",
    "const items = [1, 2, 3].map(n => n + 1);",
    "int sum = 0;\nfor (int i = 0; i < n; i++) {\n    sum += a[i];\n}",
    "def divide(a, b):\n    return a / b",
    "class Dog:\n    def __init__(self, name):\n        self.name = name\n    def bark(self):\n        return 'Woof'",
]
SNIPPET_TEMPLATES = [
    "Explain what this code does:\n\n```\n{c}\n```",
    "Is there a bug in this code? How can it be improved?\n\n```\n{c}\n```",
    "Add comments to this code:\n\n```\n{c}\n```",
    "Rewrite this code in a different programming language:\n\n```\n{c}\n```",
]


Context = tuple[tuple[str, str], ...]  # (role, content) turns before a user turn: a system turn, earlier exchanges


@dataclass(frozen=True)
class Prompt:
    family: str
    text: str  # the user turn the large model answers
    context: Context = ()

    @property
    def held_out(self) -> bool:
        return is_held_out(self.text)


def is_held_out(text: str, every: int = 40) -> bool:
    """About one prompt in `every` is held out, chosen by a hash so the split never moves."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % every == 0


def _doc_passages(max_chars: int = 700) -> list[str]:
    """First paragraphs of stdlib module docstrings, cut at a sentence end near max_chars."""
    passages = []
    for name in DOC_MODULES:
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except Exception:  # a module missing from this Python build is simply skipped
            continue
        text = " ".join(doc.split())
        if len(text) < 120:
            continue
        if len(text) > max_chars:
            cut = text.rfind(". ", 0, max_chars)
            text = text[: cut + 1] if cut > 100 else text[:max_chars]
        passages.append(text)
    return passages


def all_prompts() -> list[Prompt]:
    """Every prompt, deduplicated, in a fixed order."""
    out: list[Prompt] = []
    for i, t in enumerate(TOPICS):
        u = TOPICS[(i * 7 + 3) % len(TOPICS)]  # a second topic for the comparison templates
        out += [Prompt("chat", tpl.format(t=t, u=u)) for tpl in CHAT_TEMPLATES]
    for s in SENTENCES:
        for lang in LANGUAGES:
            out += [Prompt("translation", tpl.format(lang=lang, s=s)) for tpl in TRANSLATION_TEMPLATES]
    for p in _doc_passages():
        out += [Prompt("summarization", tpl.format(p=p)) for tpl in SUMMARY_TEMPLATES]
    for o in CONTINUATION_OPENINGS:
        out += [Prompt("continuation", tpl.format(o=o)) for tpl in CONTINUATION_TEMPLATES]
    for task in CODE_TASKS:
        for lang in CODE_LANGUAGES:
            out += [Prompt("code", tpl.format(lang=lang, task=task)) for tpl in CODE_TEMPLATES]
    for c in CODE_SNIPPETS:
        out += [Prompt("code", tpl.format(c=c)) for tpl in SNIPPET_TEMPLATES]
    seen: set[str] = set()
    unique = []
    for p in out:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique


def _contents(prompt: Prompt) -> list:
    return [prompt.family, prompt.text, prompt.context]


def digest(prompts: list[Prompt]) -> str:
    """A short hash of a prompt list's contents: data made from the list is cached under it."""
    blob = json.dumps([_contents(p) for p in prompts])
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def prefix_digests(prompts: list[Prompt]) -> list[str]:
    """`digest(prompts[:k])` for every k from 1 to len(prompts), in one pass: the JSON of a list is
    its items' JSON joined, so each prefix's hash continues the one before."""
    running, digests = hashlib.sha256(b"["), []
    for i, p in enumerate(prompts):
        running.update((", " if i else "").encode() + json.dumps(_contents(p)).encode())
        closed = running.copy()
        closed.update(b"]")
        digests.append(closed.hexdigest()[:8])
    return digests


def read_chat_prompts(path: Path) -> list[Prompt]:
    """Conversations from JSON lines (gzipped if the name ends in .gz) of {"messages": [...]}, each
    ending with a user turn, as prompts of the line's "family", or else one that tells their shape:
    chat (one user turn), system or multiturn."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    prompts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        *before, last = record["messages"]
        if last["role"] != "user":
            raise ValueError(f"{path}: a conversation must end with a user turn: {line[:80]}")
        context = tuple((m["role"], m["content"]) for m in before)
        roles = {role for role, _ in context}
        shape = "multiturn" if "assistant" in roles else "system" if "system" in roles else "chat"
        prompts.append(Prompt(record.get("family", shape), last["content"], context))
    return prompts


def split_prompts(seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held_out), each shuffled with `seed` so any prefix mixes all families."""
    prompts = all_prompts()
    train = [p for p in prompts if not p.held_out]
    held = [p for p in prompts if p.held_out]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
