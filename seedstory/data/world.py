"""The synthetic story world's definition: cast, settings, props, positions, actions, layout, palette and
caption grammar. Plain data, no drawing (``seedstory.data.synthetic`` renders, parses and detects).

Visual language (all coordinates are fractions of the square frame):

* the frame is sky above the horizon (y < ``HORIZON``) and ground below; each setting has its own sky and
  ground colour and one or two landmarks drawn between them. The top band (y < ``SKY_BAND``) is always pure
  sky and the bottom band (y > ``GROUND_BAND``) is ground except for props lying there: a setting is
  recognized from those two bands;
* at most two characters stand at two fixed positions (left / right, ``POSITIONS``) with
  their feet on ``FEET_Y``; a character's signature is (body shape, body colour, accessory), all unique;
* a held prop is drawn in front of its holder's belly; a prop on the ground lies at a position's feet;
* every colour a detector has to find (bodies, props) is far from every other colour of the world.
"""
from __future__ import annotations

import math

# ---------------------------------------------------------------------------------------------- layout
POSITIONS = ("left", "right")
SLOT_X = {"left": 0.27, "right": 0.73}
HORIZON = 0.6          # sky above, ground below
FEET_Y = 0.86          # bottom of every body
SKY_BAND = 0.1         # y < SKY_BAND: pure sky
GROUND_BAND = 0.9      # y > GROUND_BAND: ground (and props lying on it)
JUMP = 0.06            # how far a jumping character is lifted
PROP_SIZE = 0.14
HELD_DY = 0.08         # held prop centre: FEET_Y - HELD_DY (raised further by reading / jumping)
GROUND_PROP_Y = 0.925  # centre of a prop lying on the ground
# Detection regions, relative to a position's x (dx0, dx1) and absolute in y.
BODY_REGION = (-0.23, 0.23, 0.28, 0.87)
HELD_REGION = (-0.05, 0.05, 0.66, 0.88)
GROUND_REGION = (-0.08, 0.08, 0.87, 0.99)

OUTLINE = (30, 30, 35)
EYE_WHITE = (250, 250, 250)
PUPIL = OUTLINE

# --------------------------------------------------------------------------------------------- cast
# Body boxes (w, h) as fractions of the frame; eyes at ``eye_y`` of the body height from its top.
SHAPES = {
    "round": {"w": 0.36, "h": 0.36, "eye_y": 0.30, "eye_dx": 0.068, "words": "round"},
    "box": {"w": 0.32, "h": 0.32, "eye_y": 0.30, "eye_dx": 0.068, "words": "square"},
    "cone": {"w": 0.36, "h": 0.42, "eye_y": 0.52, "eye_dx": 0.057, "words": "cone-shaped"},
    "pillar": {"w": 0.23, "h": 0.45, "eye_y": 0.22, "eye_dx": 0.052, "words": "tall"},
}
FILL = {"round": math.pi / 4, "box": 0.97, "cone": 0.5, "pillar": 0.93}

# Accessory boxes are relative to the body box: (x0, y0, x1, y1) with x in body widths from the body's
# left edge and y in body heights from its top (negative = above the body).
ACCESSORIES = {
    "scarf": {"colour": "teal", "words": "a teal scarf", "box": (0.0, 0.50, 1.0, 0.62)},
    "top hat": {"colour": "black", "words": "a black top hat", "box": (0.2, -0.45, 0.8, -0.05)},
    "pom-pom": {"colour": "white", "words": "a white pom-pom", "box": (0.35, -0.25, 0.65, 0.05)},
    "backpack": {"colour": "brown", "words": "a brown backpack", "box": (-0.28, 0.35, -0.02, 0.7)},
}

CAST = [
    {"name": "Pim", "shape": "round", "colour": "red", "accessory": "scarf"},
    {"name": "Bodo", "shape": "box", "colour": "blue", "accessory": "top hat"},
    {"name": "Tansy", "shape": "cone", "colour": "orange", "accessory": "pom-pom"},
    {"name": "Wex", "shape": "pillar", "colour": "purple", "accessory": "backpack"},
]
CHARACTERS = [c["name"] for c in CAST]
BY_NAME = {c["name"]: c for c in CAST}

# --------------------------------------------------------------------------------------------- props
PROPS = {
    "apple": {"colour": "lime", "article": "an", "shape": "circle with a stem"},
    "book": {"colour": "maroon", "article": "a", "shape": "rectangle"},
    "kite": {"colour": "cyan", "article": "a", "shape": "diamond with a tail"},
    "flower": {"colour": "magenta", "article": "a", "shape": "five petals"},
    "bucket": {"colour": "navy", "article": "a", "shape": "trapezoid with a handle"},
}
PROP_NAMES = list(PROPS)

# --------------------------------------------------------------------------------------------- settings
SETTINGS = {
    "meadow": {"prep": "in", "sky": "meadow sky", "ground": "grass", "landmarks": ["hills", "an oak tree"],
               "scenery": ["hill", "trunk", "crown"]},
    "beach": {"prep": "on", "sky": "beach sky", "ground": "sand", "landmarks": ["the sun", "the sea"],
              "scenery": ["sun", "sea"]},
    "snowy hill": {"prep": "on", "sky": "winter sky", "ground": "snow", "landmarks": ["mountains"],
                   "scenery": ["mountain"]},
    "cave": {"prep": "in", "sky": "cave dark", "ground": "cave floor", "landmarks": ["stalactites", "crystals"],
             "scenery": ["rock", "crystal"]},
}
SETTING_NAMES = list(SETTINGS)

# --------------------------------------------------------------------------------------------- colours
COLOURS = {
    # bodies
    "red": (225, 45, 45), "orange": (250, 145, 25), "blue": (45, 95, 230),
    "purple": (145, 65, 205),
    # props
    "lime": (140, 225, 40), "maroon": (140, 20, 75), "cyan": (70, 215, 235), "magenta": (205, 30, 160),
    "navy": (35, 45, 140),
    # accessories and details
    "teal": (0, 140, 130), "black": OUTLINE, "white": (250, 250, 250), "brown": (120, 75, 35),
    "leaf": (40, 120, 50),
    # settings
    "meadow sky": (150, 205, 245), "grass": (95, 175, 70), "hill": (130, 200, 110), "trunk": (115, 80, 50),
    "crown": (50, 130, 60),
    "beach sky": (200, 235, 250), "sand": (240, 220, 150), "sea": (30, 150, 195), "sun": (255, 230, 110),
    "winter sky": (185, 195, 225), "snow": (222, 232, 246), "mountain": (150, 160, 185),
    "cave dark": (45, 38, 62), "cave floor": (92, 80, 105), "rock": (70, 62, 85), "crystal": (195, 175, 255),
}

# --------------------------------------------------------------------------------------------- actions
ACTIONS = ("waves", "jumps", "sleeps", "sings", "reads")

# --------------------------------------------------------------------------------------------- grammar
# A caption is one or more sentences, each one of these templates. Slots:
#   {c} {c2}  a character name            {cs}  two or more names: "A and B", "A, B and C"
#   {p}       a prop name (after "the")   {ap} / {AP}  "a"/"an" + prop name (capitalized article)
#   {at}      "on the left" | "on the right"
#   {to}      "left" | "right" (after "the")
#   {s}       a setting name (after "the") {in_s}  the setting with its preposition: "on the beach"
# Every template is tied to an event; what a sentence states holds in the frame it captions.
TEMPLATES = {
    "scene": ["This story takes place {in_s}.", "It is a bright day {in_s}.", "Our story begins {in_s}."],
    "stand": ["{c} is {at}.", "{c} stands {at}."],
    "stand_holding": ["{c} is {at}, holding the {p}.", "{c} stands {at} with the {p}."],
    "lies": ["{AP} lies {at}.", "There is {ap} {at}."],
    "arrive": ["{c} arrives {at}.", "{c} shows up {at}.", "{c} appears {at}."],
    "arrive_holding": ["{c} arrives {at} with the {p}.", "{c} shows up {at}, carrying the {p}."],
    "leave": ["{c} leaves.", "{c} walks away.", "{c} says goodbye and leaves."],
    "leave_holding": ["{c} leaves with the {p}."],
    "move": ["{c} walks to the {to}.", "{c} moves to the {to}.", "{c} runs over to the {to}."],
    "swap": ["{c} and {c2} swap places.", "{c} and {c2} trade places."],
    "pickup": ["{c} picks up the {p}.", "{c} takes the {p}.", "{c} grabs the {p}."],
    "fetch": ["{c} walks to the {to} and picks up the {p}.", "{c} goes to the {to} to get the {p}."],
    "drop": ["{c} puts down the {p}.", "{c} drops the {p}.", "{c} sets the {p} on the ground."],
    "give": ["{c} gives the {p} to {c2}.", "{c} hands the {p} to {c2}."],
    "waves": ["{c} waves.", "{c} waves hello."],
    "waves_at": ["{c} waves at {c2}."],
    "jumps": ["{c} jumps.", "{c} jumps for joy.", "{c} jumps up high."],
    "sleeps": ["{c} falls asleep.", "{c} takes a nap.", "{c} sleeps."],
    "sings": ["{c} sings a song.", "{c} sings.", "{c} hums a tune."],
    "reads": ["{c} reads the book.", "{c} opens the book and reads."],
    "travel": ["{c} goes to the {s}.", "{c} travels to the {s}.", "{c} walks all the way to the {s}."],
    "travel_group": ["{cs} go to the {s}.", "{cs} travel to the {s}.", "Together, {cs} walk to the {s}."],
}
AT_PHRASE = {"left": "on the left", "right": "on the right"}

# --------------------------------------------------------------------------------------------- stories
OPENING_CAST = {1: 2, 2: 3}  # characters in an opening scene: relative weights
GROUND_PROPS = [0, 1, 1, 2]        # props lying in a place when the story first gets there: drawn uniformly


def setting_phrase(setting: str) -> str:
    return f"{SETTINGS[setting]['prep']} the {setting}"


def describe_character(c: dict) -> str:
    return (f"{c['name']}, a {SHAPES[c['shape']]['words']} {c['colour']} creature with "
            f"{ACCESSORIES[c['accessory']]['words']}")


def world_dict() -> dict:
    """Everything an analyzer needs to read a frame or a caption, JSON-ready (``world.json``)."""
    return {
        "version": 1,
        "positions": list(POSITIONS),
        "layout": {
            "slot_x": dict(SLOT_X), "horizon": HORIZON, "feet_y": FEET_Y, "sky_band": SKY_BAND,
            "ground_band": GROUND_BAND, "jump": JUMP, "prop_size": PROP_SIZE, "held_dy": HELD_DY,
            "ground_prop_y": GROUND_PROP_Y, "body_region": list(BODY_REGION), "held_region": list(HELD_REGION),
            "ground_region": list(GROUND_REGION),
            "note": "fractions of the (square) frame; regions are (dx0, dx1, y0, y1) around a position's x",
        },
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": {k: dict(v, fill=FILL[k]) for k, v in SHAPES.items()},
        "accessories": {k: dict(v, box=list(v["box"]), rgb=list(COLOURS[v["colour"]])) for k, v in ACCESSORIES.items()},
        "cast": [{**c, "rgb": list(COLOURS[c["colour"]]),
                  "description": describe_character(c)} for c in CAST],
        "props": {k: dict(v, rgb=list(COLOURS[v["colour"]])) for k, v in PROPS.items()},
        "settings": {k: dict(v, scenery=[v["sky"], v["ground"]] + v["scenery"], sky_rgb=list(COLOURS[v["sky"]]),
                             ground_rgb=list(COLOURS[v["ground"]]),
                             phrase=setting_phrase(k)) for k, v in SETTINGS.items()},
        "actions": list(ACTIONS),
        "grammar": {"templates": {k: list(v) for k, v in TEMPLATES.items()}, "at": dict(AT_PHRASE)},
    }
