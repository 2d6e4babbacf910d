"""Top-level domains an address in *code* may end in (``PiiScrubber(code=True)``).

In prose any alphabetic TLD shape is accepted; in code ``x@self.weight`` and ``q@k.transpose``
have that shape too, so code mode requires a delegated TLD: every ISO 3166 country code (the
ccTLDs) plus the generic TLDs that carry real mail (IANA root zone: the legacy gTLDs and the most
registered new gTLDs). A rare new gTLD missed here costs recall only inside code files.
"""

from __future__ import annotations

_CC = (
    "ac ad ae af ag ai al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bm bn bo br bs bt bw "
    "by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg er es et eu "
    "fi fj fk fm fo fr ga gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu id ie il im "
    "in io iq ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv ly ma mc "
    "md me mg mh mk ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr nu nz om pa "
    "pe pf pg ph pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sk sl sm sn so sr ss "
    "st su sv sx sy sz tc td tf tg th tj tk tl tm tn to tr tt tv tw tz ua ug uk us uy uz va vc ve vg vi vn "
    "vu wf ws ye yt za zm zw"
)
_GENERIC = (
    "com net org edu gov mil int arpa aero asia biz cat coop info jobs mobi museum name post pro tel "
    "travel xxx app dev page blog cloud tech online site store shop xyz top email link live news art "
    "club design digital agency company solutions systems network services studio media group world "
    "life space website software consulting center today global academy institute school university "
    "science foundation social team work works zone one lol wtf ninja rocks codes tools engineering "
    "expert money finance bank insurance capital ventures partners legal law health care clinic "
    "family love guru photo photos pics gallery events email mail inc ltd llc gmbh berlin london paris "
    "nyc tokyo amsterdam"
)

TLDS: frozenset[str] = frozenset((_CC + " " + _GENERIC).split())
