"""Write the demo's sentence pool: thousands of distinct everyday sentences from a small grammar.

The CPU demo teaches a frozen LLM to hear. If training speaks only a hundred sentences, the
projector learns WHICH sentence was said instead of the words (measured: every good "Repeat"
answer was a training sentence, and held-out sentences got unrelated answers). It needs thousands
of distinct sentences, each heard once or twice, so that only hearing the words lowers the loss.

No offline corpus of everyday English with a clear licence installs here, and having the demo's
own LLM write them (SmolLM2-135M, greedy, one prompt per word) kept ~60% of its answers but took
about a minute of this CPU per 40 sentences. So the sentences come from a grammar written for
this project (same licence as the code): twelve everyday frames (statements, questions, requests)
whose slots take ~600 words, sampled with a fixed seed, kept at 4-12 words (1-6 s in eSpeak at
the demo's speeds) and de-duplicated. A held-out sentence is then a new combination of words the
training sentences use in other combinations: the projector must hear each word.

    python -m recipe.write_sentences --out recipe/sentence_pool.txt --n 4200    # a second

The committed pool is exactly this command's output.
"""
import argparse
import random
import re
import sys
from pathlib import Path

from support import checks

MIN_WORDS, MAX_WORDS = 4, 12

SLOTS = {
    "someone": """my sister, my brother, our neighbour, the teacher, the old man, a little girl,
        my friend, the bus driver, her father, his mother, the doctor, the children, my uncle,
        the manager, your cousin, the waiter, the students, my grandmother, the new nurse,
        the baker, our landlord, the postman, my aunt, the farmer, his wife, her husband,
        the librarian, a tourist, the coach, my boss, the twins, the pilot, our guests,
        the painter, the young couple, the shop owner, my roommate, the captain, grandpa""",
    "did": """found, lost, bought, painted, washed, carried, dropped, broke, fixed, borrowed,
        sold, cleaned, moved, opened, closed, hid, packed, wrapped, ordered, returned, forgot,
        picked up, left, tidied, repaired, measured, weighed, emptied, polished, hung up""",
    "do": """bring, carry, move, clean, open, close, check, find, wrap, hold, fix, return, take,
        fold, empty, lock, paint, sell, borrow, keep, hide, pack, wash, lend, weigh""",
    "kind": """red, blue, green, old, new, small, heavy, wooden, broken, empty, yellow, tiny,
        dusty, shiny, warm, cold, soft, clean, dirty, expensive, cheap, round, striped, plastic,
        metal, glass, purple, orange, brown, white, black, silver, golden, spare, lovely, strange,
        famous, favourite, borrowed, second""",
    "thing": """umbrella, chair, bicycle, lamp, basket, bottle, blanket, kettle, suitcase, ladder,
        mirror, jacket, camera, guitar, notebook, pillow, bucket, candle, map, ticket, parcel,
        scarf, helmet, teapot, wallet, hammer, radio, clock, painting, sofa, kite, drum, spoon,
        bowl, towel, box, key, coat, hat, ring, vase, desk, rug, fan, tent, sledge, torch,
        envelope, calendar, pencil, piano, carpet, microwave, shovel, sweater, bench, cushion""",
    "things": """apples, oranges, eggs, tickets, books, candles, bottles, potatoes, onions,
        lemons, stamps, envelopes, tomatoes, bananas, cups, plates, chairs, flowers, batteries,
        pencils, biscuits, carrots, cakes, sandwiches, postcards, towels, peaches, buttons""",
    "place": """in the kitchen, near the window, at the station, under the table, behind the door,
        in the garden, on the bus, at the market, next to the bridge, in the attic, by the river,
        on the roof, in the car, at the office, in the hallway, on the balcony, at the library,
        in the basement, near the school, at the beach, in the shed, on the train, at the airport,
        in the park, by the fireplace, on the shelf, at the hospital, in the garage,
        outside the bakery, at the corner, on the stairs, in the classroom, at the hotel,
        near the church, in the cellar, under the bed, beside the fountain, at the farm""",
    "past": """this morning, last night, on monday, yesterday afternoon, before lunch,
        after school, last week, after dinner, early today, on sunday, last winter,
        before breakfast, at noon, on tuesday, last month, on saturday, after the meeting,
        last spring, at dawn, on wednesday, before the storm, during the holidays, on thursday,
        last autumn, yesterday, two days ago, at midnight, on friday evening""",
    "later": """tomorrow, next week, on monday, tomorrow afternoon, before lunch, after school,
        this weekend, in the summer, after dinner, on sunday, in the winter, before breakfast,
        at noon, on tuesday, next month, this evening, on saturday, after the meeting,
        in the spring, on wednesday, during the holidays, on thursday, in the autumn,
        tonight, next year, on friday evening, later today, soon""",
    "activity": """go swimming, bake a cake, visit the museum, walk the dog, paint the fence,
        plant some tomatoes, learn the piano, catch the early train, watch a film,
        read the newspaper, clean the windows, call the plumber, fix the roof, buy new shoes,
        cook some soup, climb the hill, wash the car, feed the ducks, water the plants,
        write a letter, play tennis, mend the chair, book a table, visit grandma, go fishing,
        ride a bicycle, pick some berries, sweep the floor, hang the washing, build a snowman,
        order a pizza, find a parking space, learn to dance, go camping, move the sofa,
        choose a present, catch the last bus, make some tea, paint the kitchen, sing a song""",
    "event": """dinner, the guests arrive, the rain starts, the shop closes, we leave, it gets
        dark, the train comes, the film starts, lunch, the children wake up, the meeting,
        the match begins, the snow melts, the bakery opens, school finishes""",
    "state": """full, empty, broken, ready, locked, open, dirty, still wet, too heavy, missing,
        cold, clean, very old, brand new, too small, already sold, quite cheap, almost finished""",
    "number": "two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty",
    "shop": """market, bakery, supermarket, corner shop, pharmacy, post office, flower shop,
        bookshop, butcher, petrol station, garden centre, hardware store""",
}
FRAMES = [
    "{someone} {did} the {kind} {thing} {place} {past}.",
    "could you {do} the {kind} {thing} {place}?",
    "did {someone} {do} the {thing} {past}?",
    "i think {someone} will {activity} {later}.",
    "{past}, {someone} {did} a {kind} {thing}.",
    "where did {someone} put the {kind} {thing}?",
    "please {do} the {thing} before {event}.",
    "the {kind} {thing} {place} is {state}.",
    "{someone} wants to {activity} {later}.",
    "we should {activity} before {event}.",
    "how long does it take to {activity}?",
    "{someone} bought {number} {things} at the {shop} {past}.",
]


def words(slot: str) -> list[str]:
    return [" ".join(w.split()) for w in SLOTS[slot].split(",") if w.strip()]


def sentence(frame: str, rng: random.Random) -> str:
    slots = re.findall(r"{(\w+)}", frame)
    text = frame.format(**{s: rng.choice(words(s)) for s in slots})
    # "a old" -> "an old": the frames put "a" before the kind slot
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def write_pool(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences of MIN_WORDS-MAX_WORDS words, frames taken in turn."""
    rng, pool, seen = random.Random(seed), [], set()
    tries = 0
    while len(pool) < n:
        s = sentence(FRAMES[tries % len(FRAMES)], rng)
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"the grammar gave only {len(pool)} distinct sentences")
        if MIN_WORDS <= len(s.split()) <= MAX_WORDS and s not in seen:
            seen.add(s)
            pool.append(s)
    return pool


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).with_name("sentence_pool.txt")))
    p.add_argument("--n", type=int, default=4200, help="distinct sentences to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pool = write_pool(args.n, args.seed)
    Path(args.out).write_text("".join(s + "\n" for s in pool))
    vocabulary = {w.strip(",.?") for s in pool for w in s.split()}
    print(f"{len(pool)} distinct sentences, {len(vocabulary)} distinct words -> {args.out}")
    return pool


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
