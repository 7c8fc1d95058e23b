'use strict';
'require view';
'require dom';
'require poll';
'require rpc';
'require ui';

// igdpcp status and mappings, from controld's admin socket through the rpcd plugin
// /usr/libexec/rpcd/luci.igdpcp (docs/operating.md, "LuCI").

var callStatus = rpc.declare({ object: 'luci.igdpcp', method: 'status', expect: { } });
var callList = rpc.declare({ object: 'luci.igdpcp', method: 'list', expect: { } });
var callDelete = rpc.declare({ object: 'luci.igdpcp', method: 'delete', params: [ 'id' ], expect: { } });

function duration(s) {
	if (s === null || s === undefined) return _('permanent');
	var pad = function(n) { return String(n).padStart(2, '0'); };
	if (s < 60) return s + 's';
	if (s < 3600) return Math.floor(s / 60) + 'm' + pad(s % 60) + 's';
	if (s < 86400) return Math.floor(s / 3600) + 'h' + pad(Math.floor(s % 3600 / 60)) + 'm';
	return Math.floor(s / 86400) + 'd' + pad(Math.floor(s % 86400 / 3600)) + 'h';
}

function endpoint(ip, port) {
	return (port === null || port === undefined) ? '-' : (ip || '?') + ':' + port;
}

function pairs(obj) {
	var keys = Object.keys(obj || {}).sort();
	return keys.length ? keys.map(function(k) { return k + ' ' + obj[k]; }).join(', ') : _('none');
}

function errorText(reply) {
	return reply && reply.error ? (reply.error.message || reply.error.kind) : null;
}

return view.extend({
	load: function() {
		return Promise.all([ callStatus(), callList() ]);
	},

	handleDelete: function(m, ev) {
		var row = dom.parent(ev.currentTarget, '.tr');
		if (!confirm(_('Delete the forward of %s %d?').format(m.proto, m.ext_port)))
			return;
		row.style.opacity = 0.5;
		return callDelete(m.id).then(function(reply) {
			var err = errorText(reply);
			if (err) {
				row.style.opacity = 1;
				ui.addNotification(null, E('p', _('Not deleted: %s').format(err)), 'error');
			}
			else {
				row.remove();
			}
		});
	},

	renderStatus: function(st) {
		var err = errorText(st);
		if (err)
			return E('p', { 'class': 'alert-message warning' }, _('igdpcp is not answering: %s').format(err));
		var c = st.counters || {};
		var errors = [];
		Object.keys(c.errors || {}).sort().forEach(function(origin) {
			Object.keys(c.errors[origin]).sort().forEach(function(code) {
				errors.push(origin + ' ' + code + '×' + c.errors[origin][code]);
			});
		});
		var last = st.pcp_last_answer ? duration(Math.max(0, Math.floor(Date.now() / 1000 - st.pcp_last_answer))) +
			' ' + _('ago') : _('never');
		var facts = [
			[ _('Mode'), st.mode + (st.secure_mode ? ', ' + _('secure mode') : '') ],
			[ _('WAN address'), st.wan_ip || '-' ],
			[ _('External address'), st.ext_ip || '-' ],
			[ _('PCP server'), st.pcp_server ? st.pcp_server + ', ' + _('epoch') + ' ' + (st.pcp_epoch === null ?
				'-' : st.pcp_epoch) + ', ' + _('last answer') + ' ' + last : _('none') ],
			[ _('Mappings'), pairs(st.mappings) ],
			[ _('Requests'), pairs(c.requests) ],
			[ _('Errors'), errors.length ? errors.join(', ') : _('none') ],
			[ _('PCP RTT p50'), c.pcp_rtt_p50_ms === null || c.pcp_rtt_p50_ms === undefined ? '-' :
				c.pcp_rtt_p50_ms.toFixed(1) + ' ms' ],
			[ _('Renewals / re-syncs / natd restarts'), [ c.renewals, c.resyncs, c.natd_restarts ].join(' / ') ]
		];
		return E('table', { 'class': 'table', 'id': 'igdpcp_status' }, facts.map(function(f) {
			return E('tr', { 'class': 'tr' }, [
				E('td', { 'class': 'td left', 'width': '33%' }, f[0]),
				E('td', { 'class': 'td left' }, f[1])
			]);
		}));
	},

	renderMappings: function(reply) {
		var table = E('table', { 'class': 'table', 'id': 'igdpcp_mappings' }, [
			E('tr', { 'class': 'tr table-titles' }, [
				E('th', { 'class': 'th' }, _('External')),
				E('th', { 'class': 'th' }, _('Protocol')),
				E('th', { 'class': 'th' }, _('NAT1')),
				E('th', { 'class': 'th' }, _('LAN host')),
				E('th', { 'class': 'th' }, _('Origin')),
				E('th', { 'class': 'th' }, _('Owner')),
				E('th', { 'class': 'th' }, _('Description')),
				E('th', { 'class': 'th right' }, _('Time left')),
				E('th', { 'class': 'th' }, _('State')),
				E('th', { 'class': 'th cbi-section-actions' }, '')
			])
		]);
		var rows = (reply.mappings || []).map(L.bind(function(m) {
			return [
				endpoint(m.ext_ip, m.ext_port), m.proto, endpoint(m.nat1_ip, m.nat1_port),
				endpoint(m.int_ip, m.int_port), m.origin, m.owner, '%h'.format(m.description),
				duration(m.remaining), m.state,
				E('button', { 'class': 'btn cbi-button-remove', 'click': ui.createHandlerFn(this, 'handleDelete', m) },
					_('Delete'))
			];
		}, this));
		cbi_update_table(table, rows, E('em', errorText(reply) || _('There are no port mappings.')));
		return table;
	},

	render: function(data) {
		var status = E('div', {}, this.renderStatus(data[0]));
		var mappings = E('div', {}, this.renderMappings(data[1]));
		poll.add(L.bind(function() {
			return Promise.all([ callStatus(), callList() ]).then(L.bind(function(d) {
				dom.content(status, this.renderStatus(d[0]));
				dom.content(mappings, this.renderMappings(d[1]));
			}, this));
		}, this), 5);
		return E([], [
			E('h2', {}, _('UPnP & PCP forwarding')),
			E('div', { 'class': 'cbi-section' }, [ E('h3', {}, _('Status')), status ]),
			E('div', { 'class': 'cbi-section' }, [ E('h3', {}, _('Port mappings')), mappings ])
		]);
	},

	handleSave: null,
	handleSaveApply: null,
	handleReset: null
});
