'use strict';
'require view';
'require form';
'require rpc';
'require uci';

// igdpcp settings over UCI (/etc/config/igdpcp); saving reloads the daemons through procd's
// config trigger. The page's admin password is hashed on the router (rpcd method hash_password).

var callHash = rpc.declare({ object: 'luci.igdpcp', method: 'hash_password', params: [ 'password' ], expect: { } });

return view.extend({
	load: function() {
		return uci.load('igdpcp');
	},

	render: function() {
		var m, s, o;

		m = new form.Map('igdpcp', _('UPnP & PCP forwarding: settings'),
			_('UPnP IGD for the LAN, mapped through the provider\'s NAT with PCP (RFC 6970).'));

		s = m.section(form.NamedSection, 'service', 'service', _('Service'));
		o = s.option(form.Flag, 'enabled', _('Enabled'));
		o.rmempty = false;
		o.default = '1';

		s = m.section(form.NamedSection, 'controld', 'controld', _('Port mappings'));
		o = s.option(form.ListValue, 'mode', _('Mode'));
		o.value('auto', _('auto'));
		o.value('nat1-only', _('nat1-only: the WAN address is public'));
		o.value('cascaded', _('cascaded: PCP through the provider NAT'));
		o.value('no-nat1', _('no-nat1: routed LAN behind the provider NAT'));
		o.default = 'auto';
		o = s.option(form.Value, 'pcp_server', _('PCP server'),
			_('Empty: from DHCP option 158, else the WAN default router.'));
		o.datatype = 'ip4addr';
		o.optional = true;
		o = s.option(form.Flag, 'secure_mode', _('Secure mode'), _('A LAN host may only map ports to itself.'));
		o.default = '1';
		o = s.option(form.ListValue, 'igd_version', _('IGD version'));
		o.value('1', 'IGD:1');
		o.value('2', 'IGD:2');
		o.default = '1';
		o = s.option(form.Value, 'max_mappings_per_host', _('Mappings per LAN host'), _('0: no limit'));
		o.datatype = 'uinteger';
		o.placeholder = '256';
		o = s.option(form.Value, 'max_mappings', _('Mappings in total'), _('0: no limit'));
		o.datatype = 'uinteger';
		o.placeholder = '4096';
		o = s.option(form.ListValue, 'log_level', _('Log level'));
		[ 'debug', 'info', 'warning', 'error' ].forEach(function(l) { o.value(l); });
		o.default = 'info';
		o = s.option(form.Value, 'friendly_name', _('Device name'), _('friendlyName in the UPnP description.'));
		o.placeholder = 'igdpcp router';
		o.optional = true;
		o = s.option(form.Value, 'presentation_url', _('Presentation URL'), _('presentationURL in the UPnP description.'));
		o.datatype = 'string';
		o.optional = true;
		o = s.option(form.Value, 'notify_interval', _('SSDP notify interval'), _('Seconds between SSDP NOTIFY rounds.'));
		o.datatype = 'min(1)';
		o.placeholder = '600';
		o.optional = true;
		o = s.option(form.Value, 'external_ip', _('External address'),
			_('Reported when no PCP server maps upstream (an outer NAT forwarded by hand); wins over STUN.'));
		o.datatype = 'ip4addr';
		o.optional = true;

		s = m.section(form.NamedSection, 'natd', 'natd', _('STUN'),
			_('For a double NAT without PCP: the router asks a STUN server which address the Internet sees.'));
		o = s.option(form.Value, 'stun_server', _('STUN server'), _('Host name or IPv4 address; empty: no STUN.'));
		o.datatype = 'host';
		o.optional = true;
		o = s.option(form.Value, 'stun_port', _('STUN port'));
		o.datatype = 'port';
		o.placeholder = '3478';
		o.optional = true;
		o = s.option(form.Value, 'stun_interval', _('STUN interval'), _('Seconds between STUN queries.'));
		o.datatype = 'min(1)';
		o.placeholder = '300';
		o.optional = true;

		s = m.section(form.GridSection, 'perm_rule', _('Permission rules'),
			_('As miniupnpd\'s: first match wins; with rules, no match is a deny. Ports: PORT or PORT-PORT.'));
		s.anonymous = true;
		s.addremove = true;
		s.sortable = true;
		o = s.option(form.ListValue, 'action', _('Action'));
		o.value('allow', _('allow'));
		o.value('deny', _('deny'));
		o = s.option(form.Value, 'ext_ports', _('External ports'));
		o.placeholder = '0-65535';
		o = s.option(form.Value, 'int_addr', _('Internal addresses'));
		o.datatype = 'ip4addr';
		o.placeholder = '0.0.0.0/0';
		o = s.option(form.Value, 'int_ports', _('Internal ports'));
		o.placeholder = '0-65535';
		o = s.option(form.Value, 'comment', _('Comment'));

		s = m.section(form.NamedSection, 'controld', 'controld', _('LAN web page'),
			_('LAN hosts manage their own forwards on the router\'s page; with a password the admin manages all.'));
		o = s.option(form.Value, 'web_password', _('New admin password'),
			_('At least 8 characters. Empty: keep the current one. The router stores only its hash.'));
		o.password = true;
		o.optional = true;
		o.cfgvalue = function() { return ''; };
		o.write = function(section_id, value) {
			return callHash(value).then(function(reply) {
				if (reply.hash)
					uci.set('igdpcp', section_id, 'web_password_hash', reply.hash);
				else
					throw new Error(reply.error ? reply.error.message : 'no hash');
			});
		};
		o.remove = function() {};
		o = s.option(form.Flag, 'web_password_clear', _('Turn admin login off'),
			_('Removes the stored password hash.'));
		o.cfgvalue = function() { return '0'; };
		o.write = function(section_id, value) {
			if (value === '1')
				uci.unset('igdpcp', section_id, 'web_password_hash');
		};
		o.remove = function() {};

		return m.render();
	}
});
