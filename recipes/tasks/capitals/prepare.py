"""Writes capitals.jsonl: one multiple-choice question per country, its capital and three
other capitals from this list as distractors (seeded), so the file is the same on every run:

    python recipes/tasks/capitals/prepare.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (country, capital): sovereign states whose capital is not contested.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Switzerland", "Bern"), ("Poland", "Warsaw"), ("Czech Republic", "Prague"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"),
    ("Russia", "Moscow"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Slovenia", "Ljubljana"),
    ("Slovakia", "Bratislava"), ("Lithuania", "Vilnius"), ("Latvia", "Riga"),
    ("Estonia", "Tallinn"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"), ("Angola", "Luanda"), ("Sudan", "Khartoum"), ("Libya", "Tripoli"),
    ("China", "Beijing"), ("Japan", "Tokyo"), ("South Korea", "Seoul"),
    ("North Korea", "Pyongyang"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"), ("Cambodia", "Phnom Penh"),
    ("Mongolia", "Ulaanbaatar"), ("Afghanistan", "Kabul"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Qatar", "Doha"), ("Oman", "Muscat"),
    ("Yemen", "Sanaa"), ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"),
    ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"),
    ("United States", "Washington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Guatemala", "Guatemala City"),
    ("Panama", "Panama City"), ("Costa Rica", "San Jose"), ("Nicaragua", "Managua"),
    ("Honduras", "Tegucigalpa"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Ecuador", "Quito"),
    ("Brazil", "Brasilia"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Fiji", "Suva"), ("Papua New Guinea", "Port Moresby"),
]
SEED = 0


def rows() -> list[dict]:
    rng = random.Random(SEED)
    order = list(CAPITALS)
    rng.shuffle(order)  # fitness and held-out rows (the recipe's ranges) mix all regions
    capitals = [capital for _, capital in CAPITALS]
    out = []
    for country, capital in order:
        choices = [*rng.sample([c for c in capitals if c != capital], 3), capital]
        rng.shuffle(choices)
        out.append({"country": country, "choices": choices, "label": choices.index(capital)})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("capitals.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    print(f"wrote {path} ({len(CAPITALS)} rows)")
