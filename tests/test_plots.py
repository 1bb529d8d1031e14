"""afd_nb.plots: the AFD schematic has every box of the method once, its loss boxes in their optimizers' colours,
and draws into a caller's axes."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from afd_nb.plots import afd_schematic, method_style, METHOD_COLORS

BOXES = {'x', 'x_adv', 'teacher', 'backbone', 'D1', 'D2', 'classifier', 'L_ce', 'L_dis', 'L_sep', 'L_align', 'deploy',
         'opt1', 'opt2', 'opt3'}


def test_schematic_boxes_and_labels():
    fig = afd_schematic()
    try:
        ax, = fig.axes
        gids = [p.get_gid() for p in ax.patches if p.get_gid()]
        assert sorted(gids) == sorted(BOXES), gids
        by = {p.get_gid(): p for p in ax.patches if p.get_gid()}
        for loss, opt in [('L_dis', 'opt1'), ('L_sep', 'opt2'), ('L_ce', 'opt3'), ('L_align', 'opt3')]:
            assert by[loss].get_edgecolor() == by[opt].get_facecolor(), (loss, opt)
        assert by['D1'].get_edgecolor()[:3] == matplotlib.colors.to_rgb(METHOD_COLORS['afd'])
        texts = [t.get_text() for t in ax.texts]
        assert any('\\tilde y' in t and 'L_{dis}' in t for t in texts)     # the confusing label on D2's loss
        assert any('L_{ce}' in t and 'y)' in t and 'tilde' not in t for t in texts)   # the clean label on D1's loss
        assert sum('.step()' in t for t in texts) == 3
        fig.canvas.draw()                                                     # mathtext parses
    finally:
        plt.close(fig)


def test_schematic_draws_into_given_axes():
    fig, (a, b) = plt.subplots(1, 2)
    try:
        assert afd_schematic(b) is fig
        assert not a.patches and len([p for p in b.patches if p.get_gid()]) == len(BOXES)
    finally:
        plt.close(fig)


def test_method_style_unchanged():
    assert method_style('afd') == dict(color=METHOD_COLORS['afd'], label='AFD')
